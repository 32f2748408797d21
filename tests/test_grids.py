"""Weight grids: the integer grid is the arithmetic the solvers always had, and a registered grid is what every
quantize / dequantize path uses."""

from __future__ import annotations

import re

import pytest
import torch

from tlq_hf.grids import GRIDS, Grid, IntGrid, QParams, grid_of
from tlq_hf.nn import TLQLinear
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

    def qparams(self, groups, scheme, scale_dtype, clip=None, global_scale=None):
        scale = (groups.abs().amax(-1) / 2).clamp_min(1e-8).to(scale_dtype)
        return QParams(scale=scale, zero=torch.zeros_like(scale, dtype=torch.int8))

    def encode(self, scaled, zero, scheme):
        return torch.clamp(torch.round(scaled * 2) / 2, -2, 2) + zero

    def storage(self, shape, scheme):
        return tuple(shape), torch.float32

    def pack(self, codes, scheme):
        return codes.float()

    def unpack(self, packed, scheme, shape):
        return packed.reshape(shape)


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
        module = TLQLinear.from_codes(gcodes, gqp, scheme)  # the packed layer stores and decodes through the grid
        assert torch.equal(module.dequantized_weight(torch.float32), deq)
    finally:
        GRIDS.unregister("test-halves")


# ----------------------------------------------------------------------------- float grids against compressed-tensors


def _reference(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(preset, ["Linear"]).weights


@pytest.mark.parametrize(
    "grid,preset,group_size",
    [("nvfp4", "NVFP4A16", 16), ("mxfp4", "MXFP4A16", 32), ("fp8", "FP8_DYNAMIC", -1)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_float_grids_match_compressed_tensors_qparams_codes_and_dequantization(grid, preset, group_size, seed):
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = _reference(preset)
    bits = 8 if grid == "fp8" else 4
    scheme = QuantScheme(bits=bits, group_size=group_size, grid=grid)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=gen) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different ranges
    w[3, :40] = 0.0  # an all-zero group
    w[5, 7] = 37.0  # an outlier
    w = w.bfloat16().float()
    groups = w.reshape(24, -1, 128 if group_size == -1 else group_size)
    gscale = generate_gparam(w.min(), w.max()) if grid == "nvfp4" else None
    ref_scale, ref_zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gscale)
    qp = compute_qparams(w, scheme, scale_dtype=torch.float32)
    # the scale compressed-tensors computes is the one it stores: E4M3 times the global scale for NVFP4, the
    # power of two whose E8M0 exponent it stores for MXFP4, the model-dtype scale for FP8
    ours = grid_of(scheme).group_scale(qp) if grid == "mxfp4" else qp.scale
    assert torch.equal(ours.float(), ref_scale.float()), grid
    if gscale is not None:
        assert torch.equal(qp.global_scale, gscale) and qp.scale.dtype == torch.float8_e4m3fn
    codes = quantize_codes(w, qp, scheme)
    ref_codes = quantize(w, ref_scale, ref_zero, args, global_scale=gscale)
    assert torch.equal(codes, ref_codes.float())
    ref_back = dequantize(ref_codes, ref_scale, ref_zero, args, global_scale=gscale)
    assert torch.equal(dequantize_codes(codes, qp, scheme, dtype=torch.float32), ref_back.float())


def test_e2m1_rounding_is_compressed_tensors_cast_including_every_tie():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    from tlq_hf.grids import round_to_e2m1

    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, 6.0])
    x = torch.cat([torch.linspace(-6, 6, 20001), ties, -ties])
    assert torch.equal(round_to_e2m1(x), cast_to_fp4(x.clone()))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(bits=4, group_size=32, grid="nvfp4"), "group_size=32 (use 16)"),
        (dict(bits=8, group_size=16, grid="nvfp4"), "bits=8 (use 4)"),
        (dict(bits=4, group_size=32, sym=False, grid="mxfp4"), "sym=False"),
        (dict(bits=4, group_size=-1, grid="fp8"), "bits=4 (use 8)"),
    ],
)
def test_schemes_that_do_not_fit_a_float_grid_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        QuantScheme(**kwargs)


@pytest.mark.parametrize("grid,bits,group_size", [("nvfp4", 4, 16), ("mxfp4", 4, 32), ("fp8", 8, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rounds_onto_each_float_grid_and_beats_rounding_to_nearest(grid, bits, group_size, act_order):
    from tlq_hf.grids import round_to_e2m1

    scheme = QuantScheme(bits=bits, group_size=group_size, grid=grid)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=gen)
    mix = torch.randn(128, 128, generator=gen) / 8 + torch.eye(128)
    x = torch.randn(512, 128, generator=gen) @ mix  # correlated inputs: where GPTQ's updates pay
    codes, qp = gptq(w, weighted_hessian(x), scheme, act_order=act_order)
    assert qp.scale.dtype == grid_of(scheme).stored_scale_dtype(w.dtype) == compute_qparams(w, scheme).scale.dtype
    if grid == "fp8":
        assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())
    else:
        assert torch.equal(codes, round_to_e2m1(codes)) and codes.abs().max() <= 6
    if grid == "nvfp4":  # one global scale, the original weight's, for every group
        assert torch.equal(qp.global_scale, grid_of(scheme).global_scale(w))
    rtn_codes, rtn_qp = quantize_weight(w, scheme)
    err = ((w - dequantize_codes(codes, qp, scheme, dtype=torch.float32)) @ x.T).pow(2).mean()
    rtn_err = ((w - dequantize_codes(rtn_codes, rtn_qp, scheme, dtype=torch.float32)) @ x.T).pow(2).mean()
    assert err < 0.9 * rtn_err, (float(err), float(rtn_err))


@pytest.mark.parametrize("grid,bits,group_size", [("nvfp4", 4, 16), ("mxfp4", 4, 32), ("fp8", 8, -1)])
def test_awq_clipping_searches_on_each_float_grid_and_never_loses_to_rounding(grid, bits, group_size):
    from tlq_hf.solvers.awq import awq_clip_search

    scheme = QuantScheme(bits=bits, group_size=group_size, grid=grid)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 128, generator=gen)
    w[:, ::16] *= 6  # outlier columns: clipping the rest pays
    x = torch.randn(256, 128, generator=gen)
    qp = awq_clip_search(w, x, None, scheme, scale_dtype=torch.float32)
    codes = quantize_codes(w, qp, scheme)
    rtn_codes, rtn_qp = quantize_weight(w, scheme, scale_dtype=torch.float32)

    def err(c, q):
        return float(((w - dequantize_codes(c, q, scheme, dtype=torch.float32)) @ x.T).pow(2).sum())

    assert err(codes, qp) <= err(rtn_codes, rtn_qp) * (1 + 1e-6)
    if grid == "nvfp4":  # the clipped scales keep the whole weight's global scale
        assert torch.equal(qp.global_scale, rtn_qp.global_scale)
