"""Run a quantized checkpoint in ``pipeline("image-text-to-text")``, the transformers high-level API.

    python examples/pipeline_inference.py --checkpoint tlq-example-w4

Chat-format messages with an image go in; the generated text comes out. Nothing tlq-specific is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import task_rows
from transformers import pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="tlq-example-w4")
    args = p.parse_args()
    if not Path(args.checkpoint).exists() and "/" not in args.checkpoint:
        sys.exit(f"{args.checkpoint} not found: run examples/quantize_on_load.py --out {args.checkpoint} first")

    pipe = pipeline("image-text-to-text", model=args.checkpoint)
    for row in task_rows(3, split="test"):
        content = [{"type": "image", "image": row["image"]}, {"type": "text", "text": row["question"]}]
        messages = [{"role": "user", "content": content}]
        out = pipe(text=messages, max_new_tokens=3, return_full_text=False)
        print(f"Q: {row['question']:<55} A: {out[0]['generated_text'].strip():<10} (gold {row['answer']})")


if __name__ == "__main__":
    main()
