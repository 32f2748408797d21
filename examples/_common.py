"""Shared by the examples: the small trained VLM committed with the repository and rows of its task, so that
every example runs offline with no argument. Point ``--model`` at a Hub id (e.g. ``Qwen/Qwen2-VL-2B-Instruct``)
and ``--dataset`` at your own data to use them for real."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: A LLaVA-architecture VLM trained on a synthetic VQA task (benchmarks/train_vqa.py), 88.6 % held-out accuracy.
BENCH_MODEL = str(REPO / "benchmarks" / "models" / "llava-vqa")


def task_rows(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """``n`` rows ``{"image": PIL.Image, "question": str, "answer": str}`` of the benchmark model's task."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import vqa_task

    return [{k: item[k] for k in ("image", "question", "answer")} for item in vqa_task.make_items(n, seed, split)]
