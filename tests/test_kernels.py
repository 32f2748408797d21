"""Low-bit kernels: exact against the dequantized reference, saved checkpoints unchanged, generate() agrees."""

from __future__ import annotations

import pytest
import torch

from tlq_hf.nn import TLQLinear, prepare_kernels
from tlq_hf.nn.kernels import Int4PackCPU, select_kernel
from tlq_hf.primitives import QParams
from tlq_hf.qtypes import QuantScheme

pytestmark = pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no int4pack kernel")


def _layer(out: int, inn: int, group: int, sym: bool, dtype: torch.dtype, seed: int = 0) -> TLQLinear:
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=4, group_size=group, sym=sym)
    codes = torch.randint(-8, 8, (out, inn), generator=g, dtype=torch.int8)
    scale = (torch.rand(out, inn // group, generator=g) * 0.02 + 0.001).to(dtype)
    zero = torch.randint(-3, 4, (out, inn // group), generator=g, dtype=torch.int8)
    bias = torch.randn(out, generator=g).to(dtype)
    return TLQLinear.from_codes(codes, QParams(scale=scale, zero=zero), scheme, bias=bias)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_int4pack_matches_the_dequantized_reference(group: int, sym: bool) -> None:
    layer = _layer(96, 256, group, sym, torch.bfloat16)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    # reference: the dequantized weight in fp32, so the only difference left is the kernel's bf16 rounding
    ref = x.float() @ layer.dequantized_weight(torch.float32).t() + layer.bias.float()
    codes = layer.codes().clone()
    assert prepare_kernels(layer) == {"int4pack-cpu": 1}
    with torch.no_grad():
        y = layer(x)
    assert layer.kernel_name == "int4pack-cpu" and layer.weight_packed is None  # the kernel copy replaced it
    assert y.shape == (3, 5, 96) and y.dtype == torch.bfloat16
    rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-2, rel  # bf16 output rounding; a wrong zero point or layout is off by O(1)
    assert torch.equal(layer.codes(), codes)  # codes recovered exactly from the kernel's layout


@pytest.mark.parametrize("out, inn", [(128, 256), (80, 128), (2048, 512)], ids=["blocks", "tail-rows", "wide"])
def test_codes_are_unpacked_exactly_and_the_slow_fallback_agrees(out: int, inn: int) -> None:
    layer = _layer(out, inn, 64, True, torch.bfloat16)
    codes = layer.codes().clone()
    prepare_kernels(layer)
    kernel = Int4PackCPU()
    assert torch.equal(kernel.codes(layer), codes)  # the layout inverse (blocks of 64 rows, or whole)
    assert torch.equal(kernel._codes_by_identity(layer), codes)  # what is used if the layout ever changes


def test_unpacking_a_layout_it_does_not_recognise_falls_back(monkeypatch, caplog) -> None:
    from tlq_hf.nn import kernels

    layer = _layer(64, 128, 32, True, torch.bfloat16)
    codes = layer.codes().clone()
    prepare_kernels(layer)
    wrong = kernels._inverse_layout(64, 128, 2).flip(-1)
    monkeypatch.setattr(kernels, "_inverse_layout", lambda *a: wrong)
    with caplog.at_level("WARNING", logger="tlq_hf"):
        assert torch.equal(layer.codes(), codes)
    assert "layout not recognised" in caplog.text


def test_saving_after_repack_writes_the_original_packed_weight() -> None:
    layer = _layer(64, 128, 32, False, torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert prepare_kernels(layer) == {"int4pack-cpu": 1}
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    fresh = _layer(64, 128, 32, False, torch.bfloat16, seed=5)
    fresh.prepare_kernel()
    fresh.load_state_dict(before)  # loading into a repacked layer restores the reference layout
    assert fresh.kernel_name == "dequantize" and torch.equal(fresh.codes(), layer.codes())


def test_unsupported_layers_keep_the_reference_path_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    fp32 = _layer(64, 128, 32, True, torch.float32)
    assert "slower than the dense matmul" in Int4PackCPU().unsupported(fp32)
    w3 = TLQLinear(128, 64, QuantScheme(bits=3, group_size=32, sym=True), dtype=torch.bfloat16)
    assert "W4 weight-only" in Int4PackCPU().unsupported(w3)
    with caplog.at_level("INFO", logger="tlq_hf"):
        assert select_kernel(w3) is None
    assert prepare_kernels(fp32) == {"dequantize": 1}
    assert fp32.weight_packed is not None
    layer = _layer(64, 128, 32, True, torch.bfloat16)
    prepare_kernels(layer)
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # back-propagating into the input takes the reference path
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_generate_with_the_kernel_matches_the_dequantized_reference(tiny_vlm_dirs, batch_for, tmp_path, monkeypatch):
    """A bf16 W4 g32 native checkpoint: greedy generate() through int4pack equals the reference, token for token."""
    from _helpers import auto_class

    from tlq_hf import TLQConfig
    from tlq_hf.nn import kernels

    path, batch = tiny_vlm_dirs["llava"], batch_for("llava")
    cfg = TLQConfig(bits=4, group_size=32, method="rtn", save_format="tlq")
    auto_class().from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "q")

    def generate() -> tuple[torch.Tensor, set[str]]:
        model = auto_class().from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
        names = {m.kernel_name for m in model.modules() if isinstance(m, TLQLinear)}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        return out, names

    fast, names = generate()
    assert names == {"int4pack-cpu"}  # every decoder linear runs the kernel after load
    monkeypatch.setattr(kernels, "KERNELS", {})
    ref, names = generate()
    assert names == {"dequantize"}
    assert torch.equal(fast, ref)


def _w8a8_layer(out: int, inn: int, dtype: torch.dtype, seed: int = 0) -> TLQLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out, inn), generator=g, dtype=torch.int8)
    scale = (torch.rand(out, 1, generator=g) * 0.01 + 0.001).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype)
    scheme = QuantScheme(bits=8, group_size=-1, sym=True, act_bits=8)
    zero = torch.zeros_like(scale, dtype=torch.int8)
    return TLQLinear.from_codes(codes, QParams(scale=scale, zero=zero), scheme, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_mm_matches_the_dequantized_reference(dtype: torch.dtype) -> None:
    layer = _w8a8_layer(96, 200, dtype)
    x = torch.randn(3, 5, 200, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0, 0] = 0  # an all-zero token: the eps scale, as the reference
    with torch.no_grad():
        ref = layer(x).float()  # reference path: fake-quantized activations, dequantized weight
    codes = layer.codes().clone()
    assert prepare_kernels(layer) == {"int-mm-cpu": 1}
    with torch.no_grad():
        y = layer(x)
    assert layer.weight_packed is None and y.dtype == dtype and y.shape == (3, 5, 96)
    rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel  # exact integer product, float scaling only
    assert torch.equal(layer.codes(), codes)
    state = layer.state_dict()
    fresh = _w8a8_layer(96, 200, dtype)
    assert torch.equal(state["weight_packed"], fresh.weight_packed)  # the checkpoint is unchanged


def test_int_mm_refuses_what_it_cannot_run_exactly() -> None:
    from tlq_hf.nn.kernels import IntMMCPU

    kernel = IntMMCPU()
    w4a8 = TLQLinear(128, 64, QuantScheme(bits=4, group_size=-1, sym=True, act_bits=8))
    assert "W8A8" in kernel.unsupported(w4a8)
    grouped = TLQLinear(128, 64, QuantScheme(bits=8, group_size=64, sym=True, act_bits=8))
    assert "per-channel" in kernel.unsupported(grouped)
    weight_only = TLQLinear(128, 64, QuantScheme(bits=8, group_size=-1, sym=True))
    assert "W8A8" in kernel.unsupported(weight_only)


def test_generate_with_int_mm_matches_the_reference(tiny_vlm_dirs, batch_for, tmp_path, monkeypatch):
    """A W8A8 native checkpoint: greedy generate() through _int_mm equals the reference, token for token."""
    from _helpers import auto_class

    from tlq_hf import TLQConfig
    from tlq_hf.nn import kernels

    path, batch = tiny_vlm_dirs["qwen2_vl"], batch_for("qwen2_vl")
    cfg = TLQConfig(bits=8, group_size=-1, act_bits=8, method="rtn", save_format="tlq")
    auto_class().from_pretrained(path, quantization_config=cfg).save_pretrained(tmp_path / "q")

    def generate() -> tuple[torch.Tensor, set[str]]:
        model = auto_class().from_pretrained(tmp_path / "q")
        names = {m.kernel_name for m in model.modules() if isinstance(m, TLQLinear)}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        return out, names

    fast, names = generate()
    assert names == {"int-mm-cpu"}
    monkeypatch.setattr(kernels, "KERNELS", {})
    ref, names = generate()
    assert names == {"dequantize"}
    assert torch.equal(fast, ref)
