"""Quantize a VLM while loading it: one ``from_pretrained`` call with a ``TLQConfig``, then save.

    python examples/quantize_on_load.py                                  # offline, the repo's small trained VLM
    python examples/quantize_on_load.py --model Qwen/Qwen2-VL-2B-Instruct --out qwen2-vl-2b-tlq-w4

TLQ calibrates on (image, question, answer) rows: the gradient of the answer tokens' loss weights every
token, and each decoder layer is solved on the inputs the already-quantized layers produce. The saved
folder is a compressed-tensors checkpoint with a model card (README.md): plain transformers and vLLM load it
without tlq_hf.
"""

from __future__ import annotations

import argparse

from _common import BENCH_MODEL, task_rows
from transformers import AutoModelForImageTextToText, AutoProcessor

from tlq_hf import TLQConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BENCH_MODEL, help="Hub id or folder of a full-precision VLM")
    p.add_argument("--out", default="tlq-example-w4")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=64)
    args = p.parse_args()

    rows = task_rows(args.num_samples)  # your data: a list of {"image", "question", "answer"} dicts
    config = TLQConfig(bits=args.bits, group_size=128, dataset=rows, num_samples=args.num_samples)
    model = AutoModelForImageTextToText.from_pretrained(args.model, device_map="auto", quantization_config=config)
    print(model.tlq_report.summary())
    model.save_pretrained(args.out)  # compressed-tensors safetensors + README.md model card
    AutoProcessor.from_pretrained(args.model).save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
