"""Helpers shared by the tests (importable as ``_helpers``; the tests folder is on sys.path)."""

from __future__ import annotations

import torch

from tlq_hf.testing.tiny_models import FAMILIES, load_auto_class

PROMPTS = ["what is in the picture", "describe the image in one word"]


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def auto_class():
    return load_auto_class()


def write_dataset_folder(folder, n: int):
    """A local image dataset folder (images + metadata.jsonl with question/answer) that datasets can load."""
    import json

    from tlq_hf.testing.tiny_models import sample_rows

    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, row in enumerate(sample_rows(n)):
            row["image"].save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "question": row["question"], "answer": row["answer"]}) + "\n")
    return folder


__all__ = ["FAMILIES", "PROMPTS", "auto_class", "logits_of", "write_dataset_folder"]
