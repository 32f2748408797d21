"""SmoothQuant migration: per-channel scales that move activation outliers into the weights."""

from __future__ import annotations

import torch

from ..qtypes import QuantScheme
from .registry import Statistics, smoother

__all__ = ["smoothquant_scales", "smoothquant_fold_scales"]


@torch.no_grad()
def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """``s_j = max|x_j|^alpha / max|W_:j|^(1-alpha)`` over the linears sharing the input (weights become ``W s``)."""
    w_absmax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@smoother("smoothquant", needs=("absmax",))
def smoothquant_fold_scales(weights: list[torch.Tensor], group: Statistics, scheme: QuantScheme, cfg) -> torch.Tensor:
    """The migration scale of one fold from the group's per-channel input absolute maximum."""
    return smoothquant_scales(group.stats["absmax"].absmax, weights, cfg.smooth_alpha)
