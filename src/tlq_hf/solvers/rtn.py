"""Round-to-nearest: min/max qparams per group, codes by rounding. The baseline every solver must beat."""

from __future__ import annotations

import torch

from ..primitives import QParams, quantize_weight
from ..qtypes import QuantScheme
from .registry import Solution, Statistics, layer_solver

__all__ = ["rtn", "solve_rtn"]


@torch.no_grad()
def rtn(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, QParams]:
    """Quantize ``weight [out, in]`` to int8 codes and qparams (scale stored in ``scale_dtype``)."""
    return quantize_weight(weight, scheme, scale_dtype=scale_dtype or weight.dtype)


@layer_solver("rtn")
def solve_rtn(weights: list[torch.Tensor], group: Statistics, scheme: QuantScheme, cfg, scale_dtype) -> list[Solution]:
    """Each weight rounded to nearest (no statistics: also the fallback of an expert that saw too few tokens)."""
    return [rtn(w.float(), scheme, scale_dtype=scale_dtype) for w in weights]
