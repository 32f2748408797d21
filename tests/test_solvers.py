"""Solvers on small nn.Linear problems: relative claims that could fail."""

from __future__ import annotations

import pytest
import torch

from tlq_hf.primitives import compute_qparams, dequantize_codes, fake_quantize_weight
from tlq_hf.qtypes import QuantScheme
from tlq_hf.solvers import (
    awq_clip_search,
    awq_scale_search,
    gptq,
    rtn,
    smoothquant_scales,
    weighted_hessian,
    weighted_output_error,
)


def _problem(seed=0, n=2048, d_in=256, d_out=64):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few outlier channels, like real activations
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + mix)
    x[:, :4] *= 8
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    # skewed token weights: a tenth of the tokens carry most of the importance, on a different input direction
    a = torch.full((n,), 0.05)
    hot = torch.arange(0, n, 10)
    a[hot] = 5.0
    x[hot] += 3 * torch.randn(d_in, generator=g)
    return w, x, a


def _err(w, codes, qp, scheme, x, a):
    return weighted_output_error(w, dequantize_codes(codes, qp, scheme, torch.float32), x, a)


@pytest.mark.parametrize("scheme", [QuantScheme(3, 128), QuantScheme(4, 64), QuantScheme(4, -1, sym=False)])
def test_weighted_gptq_beats_rtn_and_unweighted_gptq_on_weighted_error(scheme):
    w, x, a = _problem()
    e_rtn = _err(w, *rtn(w, scheme), scheme, x, a)
    e_plain = _err(w, *gptq(w, weighted_hessian(x), scheme), scheme, x, a)
    e_weighted = _err(w, *gptq(w, weighted_hessian(x, a), scheme), scheme, x, a)
    assert e_weighted < e_plain < e_rtn


def test_gptq_act_order_static_groups_is_valid_and_better_than_rtn():
    w, x, a = _problem(seed=1)
    scheme = QuantScheme(3, 64)
    codes, qp = gptq(w, weighted_hessian(x, a), scheme, act_order=True)
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    assert _err(w, codes, qp, scheme, x, a) < _err(w, *rtn(w, scheme), scheme, x, a)


def test_weighted_hessian_matches_definition():
    x, a = torch.randn(50, 8), torch.rand(50)
    ref = sum(a[t] * torch.outer(x[t], x[t]) for t in range(50)) / a.sum()
    assert torch.allclose(weighted_hessian(x, a), ref, atol=1e-5)


@pytest.mark.parametrize("scheme", [QuantScheme(3, 128), QuantScheme(4, 128), QuantScheme(2, 64)])
def test_awq_scale_and_clip_search_never_worse_than_rtn(scheme):
    w, x, a = _problem(seed=2)
    ws = [w, torch.randn_like(w) / 16]
    s, best, base = awq_scale_search(ws, x, a, scheme)
    assert best <= base
    rtn_total = sum(_err(v, *rtn(v, scheme), scheme, x, a) for v in ws)
    assert abs(base - rtn_total) <= 1e-3 * rtn_total  # s = 1 is plain RTN
    for v in ws:  # clipping on the scaled problem never hurts either
        qp = awq_clip_search(v * s, x / s, a, scheme)
        clipped = weighted_output_error(v * s, fake_quantize_weight(v * s, qp, scheme), x / s, a)
        plain = weighted_output_error(
            v * s, fake_quantize_weight(v * s, compute_qparams(v * s, scheme), scheme), x / s, a
        )
        assert clipped <= plain * (1 + 1e-6)


def test_smoothquant_scales_balance_outlier_channels():
    w, x, _ = _problem(seed=3)
    s = smoothquant_scales(x.abs().amax(0), [w], alpha=0.5)
    assert s[:4].mean() > 2 * s[4:].mean()  # outlier channels get divided down the most
    before = x.abs().amax(0).max() / x.abs().amax(0).median()
    after = (x / s).abs().amax(0).max() / (x / s).abs().amax(0).median()
    assert after < before
