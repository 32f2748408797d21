"""Quantize, dequantize and fake-quantize tensors under a :class:`~tlq_hf.qtypes.QuantScheme`.

Pure tensor functions, no modules. Weights are ``[out_features, in_features]``; qparams are
``[out_features, n_groups]``. The arithmetic matches compressed-tensors' (scale from min/max with 0
always representable, ``scale = absmax / ((qmax - qmin) / 2)`` when symmetric) so that a checkpoint
reloaded through compressed-tensors computes exactly what the in-memory model computes.
"""

from __future__ import annotations

import torch

from .grids import QParams, grid_of
from .qtypes import QuantScheme

__all__ = [
    "QParams",
    "compute_qparams",
    "quantize_codes",
    "dequantize_codes",
    "quantize_weight",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "quantize_activation",
    "strided_rows",
]


def strided_rows(x: torch.Tensor, a: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_rows`` rows of ``x [N, d]`` and their weights ``a [N]``, evenly strided (first and last kept):
    a deterministic subsample that keeps the shape of a weighted objective."""
    if x.shape[0] <= max_rows:
        return x, a
    idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).round().long()
    return x[idx], a[idx]


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    out_features, in_features = w.shape
    scheme.check_in_features(in_features)
    return w.reshape(out_features, scheme.groups(in_features), scheme.effective_group_size(in_features))


def compute_qparams(
    w: torch.Tensor,
    scheme: QuantScheme,
    scale_dtype: torch.dtype | None = None,
    clip: torch.Tensor | float | None = None,
    global_scale: torch.Tensor | None = None,
) -> QParams:
    """Min/max quantization parameters of weight ``w`` per (row, group).

    ``scale_dtype`` is the dtype the scale is stored in (the model dtype): the scale is rounded to it
    here, so codes computed from it reproduce the stored model exactly. ``clip`` (a scalar or a
    ``[out, n_groups]`` tensor in ``(0, 1]``) shrinks the range, for clipping searches. ``global_scale``: the
    whole weight's, for grids with two-level scales when ``w`` is only part of it (by default ``w``'s own).
    """
    grid = grid_of(scheme)
    return grid.qparams(_grouped(w.float(), scheme), scheme, scale_dtype or w.dtype, clip, global_scale)


def quantize_codes(w: torch.Tensor, qparams: QParams, scheme: QuantScheme) -> torch.Tensor:
    """Codes of ``w`` under ``qparams`` (the grid's ``encode`` of ``w / scale``; int8 for the integer grid:
    ``clamp(round(w / scale) + zero)``)."""
    grid = grid_of(scheme)
    g = _grouped(w.float(), scheme)
    scale = grid.group_scale(qparams).float().unsqueeze(-1)
    zero = qparams.zero.float().unsqueeze(-1)
    return grid.encode(g / scale, zero, scheme).reshape(w.shape).to(grid.code_dtype)


def dequantize_codes(
    codes: torch.Tensor, qparams: QParams, scheme: QuantScheme, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(codes - zero) * scale`` computed in the dtype of the group multiplier (the stored scale's for the integer
    grid, as compressed-tensors does), cast to ``dtype``."""
    grid = grid_of(scheme)
    scale = grid.group_scale(qparams)
    sdtype = scale.dtype
    g = _grouped(codes, scheme).to(sdtype)
    w = grid.decode(g, qparams.zero.to(sdtype).unsqueeze(-1), scale.unsqueeze(-1))
    return w.reshape(codes.shape).to(dtype or sdtype)


def quantize_weight(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest: min/max qparams, then codes. Returns ``(codes, qparams)``."""
    qp = compute_qparams(w, scheme, scale_dtype=scale_dtype)
    return quantize_codes(w, qp, scheme), qp


def fake_quantize_weight(w: torch.Tensor, qparams: QParams, scheme: QuantScheme) -> torch.Tensor:
    """Quantize then dequantize ``w`` with fixed qparams (float32 result)."""
    return dequantize_codes(quantize_codes(w, qparams, scheme), qparams, scheme, dtype=torch.float32)


def quantize_activation(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization over the last dimension: integer-valued codes (in ``x``'s
    dtype) and the per-token scale, ``x ~ codes * scale``.

    Same operations, in the same order and dtype, as compressed-tensors' dynamic ``token`` strategy.
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    absmax = torch.maximum(x.amin(dim=-1, keepdim=True).clamp(max=0).abs(), x.amax(dim=-1, keepdim=True).clamp(min=0))
    scale = absmax / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    return torch.round(torch.clamp(x / scale, qmin, qmax)), scale


def fake_quantize_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """:func:`quantize_activation`, dequantized again: what a dynamic int8 activation computes with."""
    q, scale = quantize_activation(x, bits)
    return q * scale
