"""Helpers shared by the tests (importable as ``_helpers``; the tests folder is on sys.path)."""

from __future__ import annotations

import torch

from tlq_hf.tiny_models import FAMILIES, load_auto_class

PROMPTS = ["what is in the picture", "describe the image in one word"]


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def auto_class():
    return load_auto_class()


__all__ = ["FAMILIES", "PROMPTS", "auto_class", "logits_of"]
