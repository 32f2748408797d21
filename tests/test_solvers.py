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


def _expand(per_group: torch.Tensor, scheme: QuantScheme, in_features: int) -> torch.Tensor:
    return per_group.double().repeat_interleave(scheme.effective_group_size(in_features), dim=1)


def _textbook_gptq(w, hessian, scheme, damp=0.01):
    """Column by column, every update applied at once, inverse Hessian from its definition (no act order)."""
    gs = scheme.effective_group_size(w.shape[1])
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    W = w.double().clone()
    codes = torch.empty_like(W)
    scales, zeros = [], []
    for i in range(W.shape[1]):
        if i % gs == 0:
            qp = compute_qparams(W[:, i : i + gs].float(), QuantScheme(scheme.bits, -1, sym=scheme.sym), torch.float32)
            s, z = qp.scale[:, 0].double(), qp.zero[:, 0].double()
            scales.append(s)
            zeros.append(z)
        q = torch.clamp(torch.round(W[:, i] / s) + z, scheme.qmin, scheme.qmax)
        codes[:, i] = q
        err = (W[:, i] - (q - z) * s) / u[i, i]
        W[:, i:] -= err[:, None] * u[i, i:][None, :]
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 128), QuantScheme(3, 32, sym=True), QuantScheme(4, -1)])
def test_blocked_gptq_equals_the_textbook_column_sweep(scheme):
    """Lazy sub-block updates, the transposed sweep and the flipped factorisation change rounding only."""
    w, x, _ = _problem(seed=2, d_in=384, d_out=96)
    hessian = weighted_hessian(x)
    codes, qp = gptq(w, hessian, scheme)
    ref_codes, ref_scale, ref_zero = _textbook_gptq(w, hessian, scheme)
    # float32 vs float64 rounding flips a few codes near a rounding boundary (and later columns follow them)
    assert (codes.double() == ref_codes).double().mean() >= 0.98
    ones = torch.ones(x.shape[0])
    ref = weighted_output_error(
        w,
        ((ref_codes - _expand(ref_zero, scheme, w.shape[1])) * _expand(ref_scale, scheme, w.shape[1])).float(),
        x,
        ones,
    )
    assert _err(w, codes, qp, scheme, x, ones) == pytest.approx(ref, rel=5e-3)


def test_gptq_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from tlq_hf.solvers import gptq_factor

    _, x, a = _problem(seed=3)
    hessian = weighted_hessian(x, a)
    factor = gptq_factor(hessian, damp=0.01, act_order=True)
    h = hessian.double()[factor.perm][:, factor.perm]
    h.diagonal().add_(0.01 * h.diagonal().mean())
    expected = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    torch.testing.assert_close(factor.hinv.double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(factor.hinv, factor.hinv.triu())


@pytest.mark.parametrize("n, block", [(5, 256), (300, 64), (700, 128)])
def test_lower_triangular_inverse_in_place_reads_only_the_lower_triangle(n, block):
    """The blocked in-place inverse (row blocks of the already-inverted part, left of their diagonal only) is the
    inverse, for sizes that are no multiple of its blocks; the zeros above the diagonal stay zeros."""
    from tlq_hf.solvers.gptq import _invert_lower_

    gen = torch.Generator().manual_seed(n)
    lower = torch.randn(n, n, generator=gen, dtype=torch.float64).tril_() / n**0.5
    lower.diagonal().copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 1.0)
    m = lower.clone()
    _invert_lower_(m, block=block)
    torch.testing.assert_close(m, torch.linalg.inv(lower), rtol=1e-9, atol=1e-9)
    assert torch.equal(m, m.tril())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_factor_overwrite_works_in_the_hessians_own_memory(act_order):
    """With ``overwrite`` no second in x in matrix is made: the factor is the Hessian's storage, same values."""
    from tlq_hf.solvers import gptq_factor

    _, x, a = _problem(seed=4)
    hessian = weighted_hessian(x, a)
    hessian[:, 3] = hessian[3, :] = 0  # a dead input channel
    expected = gptq_factor(hessian, damp=0.01, act_order=act_order)
    assert expected.hinv.data_ptr() != hessian.data_ptr()  # without overwrite the caller's Hessian is untouched
    owned = hessian.clone()
    factor = gptq_factor(owned, damp=0.01, act_order=act_order, overwrite=True)
    assert factor.hinv.data_ptr() == owned.data_ptr()
    assert torch.equal(factor.hinv, expected.hinv) and torch.equal(factor.perm, expected.perm)
    assert factor.dead.nonzero().flatten().tolist() == [3]


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


def _asymmetric_problem(seed=2):
    """Full-precision inputs ``x_fp`` and exposed inputs ``x_in``: ``x_fp`` plus the error earlier quantized
    layers carried in (a correlated, channel-mixing distortion and noise)."""
    w, x_fp, a = _problem(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    distortion = torch.eye(x_fp.shape[1]) + 0.05 * torch.randn(x_fp.shape[1], x_fp.shape[1], generator=g)
    x_in = x_fp @ distortion + 0.05 * torch.randn(x_fp.shape, generator=g)
    return w, x_fp, x_in, a


def _asymmetric_error(w, codes, qp, scheme, x_fp, x_in, a):
    q = dequantize_codes(codes, qp, scheme, torch.float32)
    return float((a * (x_in @ q.T - x_fp @ w.T).pow(2).sum(1)).sum() / (a * (x_fp @ w.T).pow(2).sum(1)).sum())


@pytest.mark.parametrize("scheme", [QuantScheme(3, 128), QuantScheme(4, -1)])
def test_asymmetric_gptq_beats_gptq_on_the_full_precision_target(scheme):
    """GPTQ of ``W* = W + W (C - H)(H + lambda)^-1`` against the exposed Hessian keeps the full-precision output
    better than plain GPTQ on the exposed inputs (which copies the incoming error)."""
    from tlq_hf.solvers import asymmetric_map, asymmetric_weights, gptq_factor, gptq_quantize

    w, x_fp, x_in, a = _asymmetric_problem()
    hessian = weighted_hessian(x_in, a)
    cross = ((x_fp * a[:, None]).T @ x_in / a.sum()).float()
    (target,) = asymmetric_weights([w], asymmetric_map(hessian, cross))
    factor = gptq_factor(hessian)
    e_gptq = _asymmetric_error(w, *gptq_quantize(w, factor, scheme), scheme, x_fp, x_in, a)
    e_gptaq = _asymmetric_error(w, *gptq_quantize(target, factor, scheme), scheme, x_fp, x_in, a)
    assert e_gptaq < 0.8 * e_gptq
    # with no incoming error the target is the weight itself
    same = asymmetric_map(hessian, hessian)
    torch.testing.assert_close(same, torch.eye(w.shape[1]), atol=1e-5, rtol=0)


def test_cross_statistic_matches_definition_and_rescales_like_its_inputs():
    from tlq_hf.calibration.stats import CrossStatistic

    _, x_fp, x_in, a = _asymmetric_problem()
    stat = CrossStatistic()
    for k in range(0, x_in.shape[0], 512):  # several samples
        stat.update(x_in[k : k + 512], a[k : k + 512], k, reference=x_fp[k : k + 512])
    expected = (x_fp.double() * a[:, None].double()).T @ x_in.double() / a.double().sum()
    torch.testing.assert_close(stat.normalized().double(), expected, rtol=1e-5, atol=1e-5)
    s = torch.linspace(0.5, 2.0, x_in.shape[1])
    stat.rescale(s)
    rescaled = (x_fp / s).double().mul(a[:, None].double()).T @ (x_in / s).double() / a.double().sum()
    torch.testing.assert_close(stat.normalized().double(), rescaled, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="full-precision input"):
        stat.update(x_in[:4], a[:4], 0)
