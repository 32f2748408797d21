"""Numerics: dead channels, all-zero groups, outliers, singular Hessians, zero importance, NaN weights and
half-precision models give finite results or a clear error naming the layer; the run says what it did."""

from __future__ import annotations

import pytest
import torch
from _helpers import auto_class, logits_of

from tlq_hf import TLQConfig, quantize
from tlq_hf.calibration.importance import Tempering, TokenWeighting, temper
from tlq_hf.nn import TLQLinear
from tlq_hf.primitives import dequantize_codes
from tlq_hf.qtypes import QuantScheme
from tlq_hf.solvers import gptq, gptq_factor, rtn, weighted_hessian
from tlq_hf.testing.tiny_models import sample_rows

SCHEME = QuantScheme(bits=3, group_size=32, sym=True)


def _data(tokens: int = 256, width: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, width, generator=g), torch.randn(tokens, width, generator=g)


def _error(w: torch.Tensor, codes, qp, x: torch.Tensor) -> float:
    deq = dequantize_codes(codes, qp, SCHEME, dtype=torch.float32)
    return float(((x @ (w - deq).T) ** 2).sum())


def test_dead_input_channels_get_zero_weight_and_finite_codes():
    w, x = _data()
    x[:, :40] = 0  # channels that never carry a value: zero Hessian rows and columns
    codes, qp = gptq(w, weighted_hessian(x), SCHEME)
    deq = dequantize_codes(codes, qp, SCHEME, dtype=torch.float32)
    assert torch.isfinite(qp.scale.float()).all() and torch.isfinite(deq).all()
    assert _error(w, codes, qp, x) <= _error(w, *rtn(w, SCHEME), x)


def test_all_zero_groups_get_a_positive_scale():
    """RTN keeps an all-zero group exactly zero; GPTQ may move earlier columns' error into it (by design), finite."""
    w, x = _data()
    w[:, 32:64] = 0
    for _, qp in (rtn(w, SCHEME), gptq(w, weighted_hessian(x), SCHEME)):
        assert (qp.scale.float() > 0).all() and torch.isfinite(qp.scale.float()).all()
    codes, qp = rtn(w, SCHEME)
    assert torch.equal(dequantize_codes(codes, qp, SCHEME, dtype=torch.float32)[:, 32:64], torch.zeros(32, 32))
    w[:, :] = 0
    codes, qp = gptq(w, weighted_hessian(x), SCHEME)
    assert torch.equal(dequantize_codes(codes, qp, SCHEME, dtype=torch.float32), torch.zeros(32, 128))


def test_a_huge_outlier_stays_in_its_group():
    w, x = _data()
    w[3, 5] = 1e4
    codes, qp = gptq(w, weighted_hessian(x), SCHEME)
    deq = dequantize_codes(codes, qp, SCHEME, dtype=torch.float32)
    assert torch.isfinite(deq).all()
    assert abs(float(deq[3, 5]) - 1e4) < 1e4 / 6  # the outlier itself is kept to within a step
    others = torch.ones(32, dtype=torch.bool)
    others[3] = False
    assert float((deq - w)[others].abs().max()) < 1.0  # other rows are not flattened by it
    assert _error(w, codes, qp, x) <= _error(w, *rtn(w, SCHEME), x)  # its row's error is compensated, not lost


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_singular_hessians_are_damped_and_gptq_still_beats_rounding(tokens):
    w, x = _data(tokens)  # rank <= tokens < 128 columns
    codes, qp = gptq(w, weighted_hessian(x), SCHEME)
    assert torch.isfinite(qp.scale.float()).all()
    assert _error(w, codes, qp, x) <= _error(w, *rtn(w, SCHEME), x) + 1e-6


def test_non_finite_calibration_inputs_are_refused():
    _, x = _data()
    x[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf.*bfloat16 or float32"):
        gptq_factor(weighted_hessian(x))


def test_zero_or_non_finite_importance_becomes_uniform_and_is_said(caplog):
    t = Tempering(1.0, 0.05, 20.0, 0.0)
    for raw in (torch.zeros(7), torch.full((7,), float("nan")), torch.tensor([1.0, float("inf"), 0.0])):
        assert torch.equal(temper(raw, t), torch.ones(raw.shape[0]))

    class Grad:
        raw = {"m": [torch.zeros(5), torch.rand(5) + 0.1]}

    from tlq_hf.calibration.distributed import Comm

    weighting = TokenWeighting(Grad(), "fisher", t, 1.0, [torch.zeros(5, dtype=torch.bool)] * 2, [0, 1], Comm())
    with caplog.at_level("INFO", logger="tlq_hf"):
        first, second = weighting.for_modules(["m"])
    assert torch.equal(first, torch.ones(5)) and not torch.equal(second, torch.ones(5))
    assert "1 of 2 samples carry no usable gradient" in caplog.text


@pytest.mark.parametrize("method", ["rtn", "tlq"])
def test_a_nan_weight_is_refused_naming_the_layer_and_the_model_is_put_back(tiny_vlm_dirs, method):
    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], dtype=torch.float32)
    name = "model.language_model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"{name}.*NaN/Inf"):
        quantize(model, TLQConfig(method=method, dataset=sample_rows(4), num_samples=4))
    assert not any(isinstance(m, TLQLinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_calibrate_to_finite_outputs(tiny_vlm_dirs, batch_for, dtype):
    cfg = TLQConfig(dataset=sample_rows(4), num_samples=4, bits=3, group_size=32)
    model = auto_class().from_pretrained(tiny_vlm_dirs["qwen2_vl"], dtype=dtype, quantization_config=cfg)
    assert {m.weight_scale.dtype for m in model.modules() if isinstance(m, TLQLinear)} == {dtype}
    assert all(torch.isfinite(torch.tensor([r.error_after for r in model.tlq_report.layers])))
    assert torch.isfinite(logits_of(model, batch_for("qwen2_vl"))).all()


@pytest.mark.parametrize("row", [0, 1500, 2047])
def test_the_banded_finiteness_check_sees_a_nan_in_any_band(row):
    from tlq_hf.solvers.gptq import _all_finite

    h = torch.eye(2048)  # 512 rows per band
    assert _all_finite(h)
    h[row, 7] = float("nan")
    assert not _all_finite(h)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        gptq_factor(h)
