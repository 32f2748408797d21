"""The asymmetric GPTQ target (GPTAQ, arXiv 2504.02692): quantize for the full-precision output.

Plain GPTQ on exposed inputs minimises ``||(W - Q) X_in||^2``: it keeps the layer's output on the inputs the
already-quantized layers produce, and so copies the error those layers carried in. The asymmetric objective
takes the full-precision model's output as the target instead:

    min_Q  sum_t a_t ||Q x_in,t - W x_fp,t||^2

With ``H = sum_t a_t x_in x_in^T`` and the cross statistic ``C = sum_t a_t x_fp x_in^T`` (both normalised by
``sum_t a_t``), the objective equals ``tr((Q - W*) H (Q - W*)^T)`` plus a constant, where ``W*`` is the
unconstrained optimum (the weight that best undoes the incoming error). So the asymmetric problem is plain GPTQ
of ``W*`` against ``H``: this module computes ``W*``; :func:`~tlq_hf.solvers.gptq.gptq_quantize` does the rest.
With GPTQ's damping ``lambda I`` read as a ridge term ``lambda ||Q - W||^2`` (a pull towards the original
weight), ``W* = W (C + lambda I)(H + lambda I)^-1 = W + W (C - H)(H + lambda I)^-1``: exactly ``W`` when the
inputs agree (``x_fp = x_in``), and bounded however few tokens the statistics saw.
"""

from __future__ import annotations

import torch

from ..qtypes import QuantScheme
from .gptq import gptq_factor, gptq_quantize
from .registry import Solution, Statistics, layer_solver

__all__ = ["asymmetric_map", "asymmetric_weights", "solve_gptaq"]


@torch.no_grad()
def asymmetric_map(hessian: torch.Tensor, cross: torch.Tensor, *, damp: float = 0.01) -> torch.Tensor:
    """``M = I + (C - H)(H + lambda I)^-1`` (float32, ``[in, in]``) so that ``W* = W M`` for every weight reading
    this input.

    ``hessian`` and ``cross`` are normalised the same way; ``lambda = damp * mean(diag H)`` with dead channels'
    diagonal counted as 1, as in :func:`~tlq_hf.solvers.gptq.gptq_factor`. Solved in float64 by one Cholesky
    factorisation (``H`` is symmetric positive definite once damped). A dead input channel (never non-zero in
    ``x_in``) has a zero column in ``C - H``, so its column of ``M`` is the identity's.
    """
    H = hessian.double().clone()
    delta = cross.double() - H
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damp * diag.mean())
    L = torch.linalg.cholesky(H)
    del H
    m = torch.cholesky_solve(delta.T.contiguous(), L).T  # (C - H) H_d^-1 = (H_d^-1 (C - H)^T)^T, H_d symmetric
    m.diagonal().add_(1.0)
    return m.float().contiguous()


@torch.no_grad()
def asymmetric_weights(weights: list[torch.Tensor], mapping: torch.Tensor) -> list[torch.Tensor]:
    """``W* = W M`` for each weight ``[out, in]`` (float32 results; the weights are read as stored)."""
    return [w.float() @ mapping.to(w.device) for w in weights]


@layer_solver("gptaq", needs=("hessian", "cross"), shares_rows=True)
def solve_gptaq(
    weights: list[torch.Tensor], group: Statistics, scheme: QuantScheme, cfg, scale_dtype
) -> list[Solution]:
    """GPTQ of each ``W* = W M`` against the exposed inputs' Hessian (one factorisation for the group)."""
    hessian = group.stats.pop("hessian").take_normalized()
    mapping = asymmetric_map(hessian, group.stats.pop("cross").normalized(), damp=cfg.damp)
    targets = asymmetric_weights(weights, mapping)
    del mapping
    factor = gptq_factor(hessian, damp=cfg.damp, act_order=cfg.act_order, overwrite=True)
    del hessian
    return [gptq_quantize(w, factor, scheme, scale_dtype=scale_dtype) for w in targets]
