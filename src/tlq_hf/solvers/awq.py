"""AWQ/MBQ-style solvers under an importance-weighted output objective.

``awq_scale_search``: one per-input-channel scale ``s`` for a group of linears sharing an input; the
weights become ``W diag(s)`` and the input ``x / s`` (the caller folds ``1/s`` into the producer).
``awq_clip_search``: per (row, group) clipping of the quantization range. Both minimise
``sum_t a_t ||W x_t - Q(W) x_t||^2`` and include the identity (``s = 1``, no clipping) among their
candidates, so neither can do worse than round-to-nearest on that objective.
"""

from __future__ import annotations

import torch

from ..primitives import QParams, compute_qparams, fake_quantize_weight, quantize_codes, strided_rows
from ..qtypes import QuantScheme
from .registry import Solution, Statistics, layer_solver, smoother

__all__ = ["awq_scale_search", "awq_clip_search", "awq_fold_scales", "solve_awq", "weighted_output_error"]


def _subsample(x: torch.Tensor, a: torch.Tensor | None, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(-1, x.shape[-1]).float()
    a = torch.ones(x.shape[0], device=x.device) if a is None else a.reshape(-1).float().to(x.device)
    keep = a > 0
    return strided_rows(x[keep], a[keep], max_tokens)


def weighted_output_error(weight: torch.Tensor, qweight: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> float:
    """``sum_t a_t ||(W - Q) x_t||^2`` for ``x [N, in]``, ``a [N]``."""
    diff = (x.float() @ (weight.float() - qweight.float()).T).pow(2).sum(-1)
    return float((a.float() * diff).sum())


@torch.no_grad()
def awq_scale_search(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    token_weights: torch.Tensor | None,
    scheme: QuantScheme,
    *,
    grid: int = 20,
    max_tokens: int = 4096,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scale ``s [in]`` for linears ``weights`` sharing input ``x [N, in]``.

    ``s = m^alpha`` (``m``: importance-weighted mean ``|x|`` per channel, normalised), ``alpha`` on a grid in
    ``[0, 1)``. Returns ``(s, loss(s), loss(s=1))``.
    """
    x, a = _subsample(x, token_weights, max_tokens)
    mag = (a[:, None] * x.abs()).sum(0) / a.sum().clamp_min(1e-12)
    mag = mag.clamp_min(1e-8)
    scale_dtype = scale_dtype or weights[0].dtype

    def loss(s: torch.Tensor) -> float:
        total = 0.0
        for w in weights:
            w = w.float()
            qp = compute_qparams(w * s, scheme, scale_dtype=scale_dtype)
            q = fake_quantize_weight(w * s, qp, scheme) / s
            total += weighted_output_error(w, q, x, a)
        return total

    ones = torch.ones_like(mag)
    best_s, base = ones, loss(ones)
    best = base
    for k in range(1, grid):
        s = mag.pow(k / grid)
        s = s / (s.max() * s.min()).sqrt()
        value = loss(s)
        if value < best:
            best, best_s = value, s
    return best_s, best, base


@torch.no_grad()
def awq_clip_search(
    weight: torch.Tensor,
    x: torch.Tensor,
    token_weights: torch.Tensor | None,
    scheme: QuantScheme,
    *,
    steps: int = 10,
    min_ratio: float = 0.5,
    max_tokens: int = 2048,
    scale_dtype: torch.dtype | None = None,
    row_chunk: int = 256,
) -> QParams:
    """Per (row, group) clip ratio in ``[min_ratio, 1]`` minimising the weighted output error of that group.

    (Nine parameters: the data, then the search's knobs, keyword-only with defaults.)"""
    x, a = _subsample(x, token_weights, max_tokens)
    w = weight.float()
    out_features, in_features = w.shape
    groups, gs = scheme.groups(in_features), scheme.effective_group_size(in_features)
    scale_dtype = scale_dtype or weight.dtype
    xg = x.view(-1, groups, gs)
    ratios = [1.0 - (1.0 - min_ratio) * k / steps for k in range(steps + 1)]
    best_err = torch.full((out_features, groups), float("inf"), device=w.device)
    best_ratio = torch.ones(out_features, groups, device=w.device)
    for r in ratios:
        qp = compute_qparams(w, scheme, scale_dtype=scale_dtype, clip=r)
        dw = (w - fake_quantize_weight(w, qp, scheme)).view(out_features, groups, gs)
        err = torch.empty(out_features, groups, device=w.device)
        for o in range(0, out_features, row_chunk):
            part = torch.einsum("ngk,ogk->nog", xg, dw[o : o + row_chunk])
            err[o : o + row_chunk] = torch.einsum("n,nog->og", a, part.pow(2))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return compute_qparams(w, scheme, scale_dtype=scale_dtype, clip=best_ratio)


@layer_solver("awq", needs=("inputs",))
def solve_awq(weights: list[torch.Tensor], group: Statistics, scheme: QuantScheme, cfg, scale_dtype) -> list[Solution]:
    """Each weight's clipping searched on the group's kept input rows, then rounded to nearest."""
    x, a = group.stats["inputs"].rows(cfg.max_tokens)
    out = []
    for w in weights:
        w = w.float()
        qp = awq_clip_search(w, x, a, scheme, scale_dtype=scale_dtype)
        out.append((quantize_codes(w, qp, scheme), qp))
    return out


@smoother("awq", needs=("inputs",))
def awq_fold_scales(weights: list[torch.Tensor], group: Statistics, scheme: QuantScheme, cfg) -> torch.Tensor:
    """The AWQ scale of one fold, searched on the group's kept input rows."""
    x, a = group.stats["inputs"].rows(cfg.max_tokens)
    s, _, _ = awq_scale_search(weights, x, a, scheme, grid=cfg.awq_grid, scale_dtype=weights[0].dtype)
    return s
