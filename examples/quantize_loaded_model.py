"""Quantize a model you already hold in memory (fine-tuned, merged, patched): ``tlq_hf.quantize(model, config)``.

    python examples/quantize_loaded_model.py

The model is quantized in place and then behaves like one quantized on load: ``save_pretrained`` writes the
compressed-tensors checkpoint and the model card. Here the answer to one held-out question is generated
before and after.
"""

from __future__ import annotations

import argparse

import torch
from _common import BENCH_MODEL, task_rows
from transformers import AutoModelForImageTextToText, AutoProcessor

import tlq_hf


def answer(model, processor, row: dict) -> str:
    """The model's greedy answer (a few tokens) to ``row``'s question about its image."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[row["image"]], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BENCH_MODEL)
    p.add_argument("--out", default="tlq-example-loaded-w4")
    p.add_argument("--num-samples", type=int, default=64)
    args = p.parse_args()

    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    row = task_rows(1, split="test")[0]
    before = answer(model, processor, row)
    config = tlq_hf.TLQConfig(bits=4, group_size=128, dataset=task_rows(args.num_samples), num_samples=args.num_samples)
    tlq_hf.quantize(model, config)
    after = answer(model, processor, row)
    print(f"Q: {row['question']}  gold: {row['answer']}  full precision: {before}  W4 TLQ: {after}")
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
