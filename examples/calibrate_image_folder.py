"""Calibrate on your own images: a folder of images plus a ``metadata.jsonl`` (the ``imagefolder`` convention).

    python examples/calibrate_image_folder.py --images my_folder --out my-model-w4
    python examples/calibrate_image_folder.py          # offline: writes a small folder from the demo task first

``metadata.jsonl`` has one JSON object per line: ``{"file_name": "cat.png", "question": "...", "answer": "..."}``
(or ``"messages"`` in chat format, or ``"text"``). ``file_name`` is relative to the folder. Needs
``pip install datasets``. The same folder works on the command line:
``tlq-quantize MODEL --dataset my_folder --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import BENCH_MODEL, task_rows
from transformers import AutoModelForImageTextToText

from tlq_hf import TLQConfig


def write_folder(folder: Path, n: int) -> Path:
    """An image folder with metadata.jsonl from the demo task."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, row in enumerate(task_rows(n)):
            row["image"].save(folder / f"{i:04d}.png")
            f.write(json.dumps({"file_name": f"{i:04d}.png", "question": row["question"], "answer": row["answer"]}))
            f.write("\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BENCH_MODEL)
    p.add_argument("--images", default=None, help="folder with images and metadata.jsonl")
    p.add_argument("--out", default="tlq-example-folder-w4")
    p.add_argument("--num-samples", type=int, default=64)
    args = p.parse_args()

    folder = Path(args.images) if args.images else write_folder(Path(tempfile.mkdtemp()) / "calib", args.num_samples)
    config = TLQConfig(bits=4, group_size=128, dataset=str(folder), num_samples=args.num_samples)
    model = AutoModelForImageTextToText.from_pretrained(args.model, quantization_config=config)
    print(f"calibrated on {folder}: {model.tlq_report.summary()}")
    model.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
