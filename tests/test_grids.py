"""Weight grids: the integer grid is the arithmetic the solvers always had, and a registered grid is what every
quantize / dequantize path uses."""

from __future__ import annotations

import pytest
import torch

from tlq_hf.grids import GRIDS, Grid, IntGrid, QParams, grid_of
from tlq_hf.primitives import compute_qparams, dequantize_codes, quantize_codes, quantize_weight
from tlq_hf.qtypes import QuantScheme
from tlq_hf.solvers.gptq import gptq, weighted_hessian


def test_an_unknown_grid_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"grid='fp5'.*\('int'"):
        QuantScheme(grid="fp5")


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (8, False)])
def test_the_integer_grid_is_compressed_tensors_integer_arithmetic(bits, sym):
    scheme = QuantScheme(bits=bits, group_size=8, sym=sym)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits))
    codes, qp = quantize_weight(w, scheme, scale_dtype=torch.float32)
    assert grid_of(scheme) is GRIDS["int"] and isinstance(grid_of(scheme), IntGrid)
    g = w.reshape(6, 4, 8)
    expected = torch.clamp(torch.round(g / qp.scale[..., None]) + qp.zero[..., None].float(), scheme.qmin, scheme.qmax)
    assert codes.dtype == torch.int8 and torch.equal(codes.float(), expected.reshape(6, 32))
    back = dequantize_codes(codes, qp, scheme)
    assert torch.equal(back, ((expected - qp.zero[..., None]) * qp.scale[..., None]).reshape(6, 32))


class _Halves(Grid):
    """Half-integers in [-2, 2] (a test grid: not a real format)."""

    name = "test-halves"
    code_dtype = torch.float32

    def qparams(self, groups, scheme, scale_dtype, clip=None):
        scale = (groups.abs().amax(-1) / 2).clamp_min(1e-8).to(scale_dtype)
        return QParams(scale=scale, zero=torch.zeros_like(scale, dtype=torch.int8))

    def encode(self, scaled, zero, scheme):
        return torch.clamp(torch.round(scaled * 2) / 2, -2, 2) + zero


def test_a_registered_grid_is_used_by_quantize_dequantize_and_the_gptq_sweep():
    GRIDS.register(_Halves)
    try:
        scheme = QuantScheme(bits=4, group_size=8, grid="test-halves")
        w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
        qp = compute_qparams(w, scheme, scale_dtype=torch.float32)
        codes = quantize_codes(w, qp, scheme)
        assert codes.dtype == torch.float32 and torch.equal(codes * 2, torch.round(codes * 2))
        assert codes.abs().max() == 2  # each group's absmax lands on the grid's end
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        gcodes, gqp = gptq(w, weighted_hessian(x), scheme, act_order=False)
        assert gcodes.dtype == torch.float32 and torch.equal(gcodes * 2, torch.round(gcodes * 2))
        assert gcodes.abs().max() <= 2
        deq = dequantize_codes(gcodes, gqp, scheme, dtype=torch.float32)
        rtn_err = ((w - dequantize_codes(codes, qp, scheme)) @ x.T).pow(2).sum()
        assert ((w - deq) @ x.T).pow(2).sum() <= rtn_err  # the sweep minimises the output error on this grid too
    finally:
        GRIDS.unregister("test-halves")
