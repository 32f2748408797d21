"""Share a quantized model on the Hugging Face Hub: weights, config, processor and the model card, one commit.

    python examples/push_to_hub.py --repo you/llava-vqa-tlq-w4 --real     # needs `huggingface-cli login`
    python examples/push_to_hub.py                                          # offline: a local stand-in Hub

``model.push_to_hub(repo, processor=...)`` on a model tlq_hf quantized writes the card (base model, scheme,
method, calibration data, per-layer errors, how to load it) with the upload; transformers' own push would
replace it by a generic one. Offline, ``LocalHub`` stands in for ``huggingface_hub.HfApi``: it lays the
upload out as a Hub cache, and the model is loaded back from there with ``local_files_only=True``, exactly as
a user with the files cached would.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import BENCH_MODEL, task_rows
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

from tlq_hf import TLQConfig


class LocalHub:
    """The two ``HfApi`` calls an upload makes, writing into a Hub cache layout under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def create_repo(self, repo_id: str, **_) -> str:
        (self.root / f"models--{repo_id.replace('/', '--')}").mkdir(parents=True, exist_ok=True)
        return f"local://{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str, **_) -> str:
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        shutil.copytree(folder_path, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return f"local://{repo_id}@{commit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BENCH_MODEL)
    p.add_argument("--repo", default="tlq-examples/llava-vqa-tlq-w4")
    p.add_argument("--real", action="store_true", help="push to the real Hub (default: a local stand-in)")
    p.add_argument("--num-samples", type=int, default=64)
    args = p.parse_args()

    config = TLQConfig(bits=4, group_size=128, dataset=task_rows(args.num_samples), num_samples=args.num_samples)
    model = AutoModelForImageTextToText.from_pretrained(args.model, quantization_config=config)
    processor = AutoProcessor.from_pretrained(args.model)
    cache = Path(tempfile.mkdtemp()) / "hub"
    api = None if args.real else LocalHub(cache)
    print(f"pushed: {model.push_to_hub(args.repo, processor=processor, api=api)}")
    if args.real:
        return
    reloaded = AutoModelForImageTextToText.from_pretrained(args.repo, cache_dir=cache, local_files_only=True)
    card = ModelCard.load(next(cache.rglob("README.md")))
    print(f"reloaded {args.repo} from the stand-in: {type(reloaded).__name__}; card tags {card.data.tags}")


if __name__ == "__main__":
    main()
