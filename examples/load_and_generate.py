"""Load a pre-quantized checkpoint and ``generate``: no calibration, and tlq_hf is not even imported.

    python examples/quantize_on_load.py --out tlq-example-w4     # first, make one (or use any from the Hub)
    python examples/load_and_generate.py --checkpoint tlq-example-w4

A compressed-tensors checkpoint reloads through transformers alone (the ``compressed-tensors`` package decodes
it). A ``save_format="tlq"`` checkpoint would need ``import tlq_hf`` first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import task_rows
from transformers import AutoModelForImageTextToText, AutoProcessor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="tlq-example-w4", help="folder or Hub id of a quantized checkpoint")
    p.add_argument("--questions", type=int, default=5)
    args = p.parse_args()
    if not Path(args.checkpoint).exists() and "/" not in args.checkpoint:
        sys.exit(f"{args.checkpoint} not found: run examples/quantize_on_load.py --out {args.checkpoint} first")

    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint)
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    assert "tlq_hf" not in sys.modules  # plain transformers did all of it
    correct = 0
    for row in task_rows(args.questions, split="test"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[row["image"]], text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        reply = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        correct += reply.split()[:1] == [row["answer"]]
        print(f"Q: {row['question']:<55} A: {reply:<10} (gold {row['answer']})")
    print(f"{correct}/{args.questions} answered correctly by the quantized model")


if __name__ == "__main__":
    main()
