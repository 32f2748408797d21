"""Round-to-nearest: min/max qparams per group, codes by rounding. The baseline every solver must beat."""

from __future__ import annotations

import torch

from ..primitives import QParams, quantize_weight
from ..qtypes import QuantScheme

__all__ = ["rtn"]


@torch.no_grad()
def rtn(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, QParams]:
    """Quantize ``weight [out, in]`` to int8 codes and qparams (scale stored in ``scale_dtype``)."""
    return quantize_weight(weight, scheme, scale_dtype=scale_dtype or weight.dtype)
