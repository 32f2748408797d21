"""GPTQ with an importance-weighted Hessian (``H = X diag(a) X^T``), groups, damping, optional act order.

Pure function: weight and Hessian in, int8 codes and qparams out. With ``act_order`` the groups stay in
natural column order ("static groups", qparams from the original weight), so the result needs no
``g_idx`` and stores like any grouped checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..primitives import QParams, compute_qparams
from ..qtypes import QuantScheme

__all__ = ["GPTQFactor", "gptq", "gptq_factor", "gptq_quantize", "weighted_hessian"]


def weighted_hessian(x: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t a_t x_t x_t^T / sum_t a_t`` for inputs ``x [N, in]`` and token weights ``a [N]`` (float64 accumulate)."""
    x = x.reshape(-1, x.shape[-1]).double()
    if token_weights is None:
        return (x.T @ x / max(x.shape[0], 1)).float()
    a = token_weights.reshape(-1).double()
    return ((x * a[:, None]).T @ x / a.sum().clamp_min(1e-12)).float()


def _group_qparams(w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype) -> QParams:
    per_row = QuantScheme(bits=scheme.bits, group_size=-1, sym=scheme.sym)
    return compute_qparams(w, per_row, scale_dtype=scale_dtype)


@dataclass(frozen=True)
class GPTQFactor:
    """One Hessian's factorisation, shared by every weight that reads the same input (q/k/v, gate/up).

    ``perm`` is the column order (decreasing Hessian diagonal with act order, else natural), ``hinv`` the
    upper Cholesky factor of the damped, permuted inverse Hessian, ``dead`` the input channels that never
    carried a value (their weight columns are zeroed).
    """

    perm: torch.Tensor
    hinv: torch.Tensor
    dead: torch.Tensor
    act_order: bool


@torch.no_grad()
def gptq_factor(
    hessian: torch.Tensor, *, damp: float = 0.01, act_order: bool = False, overwrite: bool = False
) -> GPTQFactor:
    """Damp and factorise ``hessian [in, in]`` once for :func:`gptq_quantize` (``overwrite``: reuse its memory)."""
    H = hessian.detach().float()
    if not overwrite and H.data_ptr() == hessian.data_ptr():  # .float() did not copy
        H = H.clone()
    in_features = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_features, device=H.device)
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    del H
    L = torch.cholesky_inverse(L)
    return GPTQFactor(perm, torch.linalg.cholesky(L, upper=True), dead, act_order)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, QParams]:
    """Quantize ``weight [out, in]`` minimising ``tr((W - Q) H (W - Q)^T)``; return ``(codes, qparams)``."""
    scheme.check_in_features(weight.shape[1])
    factor = gptq_factor(hessian.to(weight.device), damp=damp, act_order=act_order)
    return gptq_quantize(weight, factor, scheme, block_size=block_size, scale_dtype=scale_dtype)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    factor: GPTQFactor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, QParams]:
    """GPTQ column sweep of ``weight [out, in]`` against a precomputed :class:`GPTQFactor`."""
    scale_dtype = scale_dtype or weight.dtype
    act_order = factor.act_order
    out_features, in_features = weight.shape
    scheme.check_in_features(in_features)
    gs = scheme.effective_group_size(in_features)
    W = weight.detach().float().clone()
    W[:, factor.dead.to(W.device)] = 0.0

    n_groups = scheme.groups(in_features)
    scale = torch.empty(out_features, n_groups, dtype=scale_dtype, device=W.device)
    zero = torch.zeros(out_features, n_groups, dtype=torch.int8, device=W.device)
    if act_order:  # static groups from the original weight, then quantize columns by decreasing H diagonal
        for g in range(n_groups):
            qp = _group_qparams(W[:, g * gs : (g + 1) * gs], scheme, scale_dtype)
            scale[:, g], zero[:, g] = qp.scale[:, 0], qp.zero[:, 0]
    else:
        block_size = max(gs, (block_size // gs) * gs) if gs <= in_features else in_features
    perm = factor.perm.to(W.device)
    inv_perm = torch.argsort(perm)
    W = W[:, perm]
    Hinv = factor.hinv.to(W.device)

    codes = torch.zeros_like(W, dtype=torch.int8)
    scale_f, zero_f = scale.float(), zero.float()  # per-column reads in float32 (act order: final already)
    columns = perm.tolist()
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = columns[i1 + i]
            g = col // gs
            if not act_order and col % gs == 0:  # group starts here: qparams from the updated weights
                qp = _group_qparams(W1[:, i : i + gs], scheme, scale_dtype)
                scale[:, g], zero[:, g] = qp.scale[:, 0], qp.zero[:, 0]
                scale_f[:, g], zero_f[:, g] = scale[:, g].float(), zero[:, g].float()
            s, z = scale_f[:, g], zero_f[:, g]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, scheme.qmin, scheme.qmax)
            Q1[:, i] = q
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # in place: no [out, block] temporary
            Err1[:, i] = err
        codes[:, i1:i2] = Q1.to(torch.int8)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes[:, inv_perm].contiguous(), QParams(scale=scale, zero=zero)
