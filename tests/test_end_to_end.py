"""from_pretrained(quantization_config=TLQConfig) -> save_pretrained -> from_pretrained, on all tiny families.

The compressed-tensors reload runs in a fresh interpreter that never imports tlq_hf, proving the default
format needs no plugin. Measured numbers are printed (run with ``-s``) and bounded by the asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import FAMILIES, auto_class, logits_of
from torch import nn

from tlq_hf import TLQConfig
from tlq_hf.arch import find_decoder_stack, matches_any
from tlq_hf.evaluation import compare_logits, linear_bytes_on_disk
from tlq_hf.nn import TLQLinear, kernels

SCHEMES = {
    "W4A16-g128": dict(bits=4, group_size=128),
    "W3A16-g128": dict(bits=3, group_size=128),
    "W2A16-g64": dict(bits=2, group_size=64),
    "W8A8": dict(bits=8, group_size=-1, act_bits=8),
    "W4A8": dict(bits=4, group_size=128, act_bits=8),
}


#: Name parts of the vision towers and projectors (Gemma 3's holds a raw parameter), which stay full precision.
UNQUANTIZED_PARTS = ("visual", "vision", "multi_modal_projector")


def _reload_without_plugin(folder: str, batch, out: str, dtype: str = "float32", device_map: str | None = None):
    """Load ``folder`` in a fresh interpreter (no tlq_hf import) and return its logits on ``batch``."""
    torch.save(dict(batch), out + ".inputs.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch, transformers
        cls = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        v5 = int(transformers.__version__.split(".")[0]) >= 5
        kw = {{"dtype" if v5 else "torch_dtype": torch.{dtype}}}
        if {device_map!r}: kw["device_map"] = {device_map!r}
        model = cls.from_pretrained({folder!r}, **kw)
        assert "tlq_hf" not in sys.modules, "tlq_hf was imported"
        batch = torch.load({out!r} + ".inputs.pt", weights_only=True)
        with torch.no_grad():
            logits = model(**batch).logits.float()
        state = {{k: v.float() for k, v in model.state_dict().items() if any(p in k for p in {UNQUANTIZED_PARTS!r})}}
        torch.save({{"logits": logits, "vision": state}}, {out!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


#: vLLM's checkpoint-to-module renames for these families (its ``hf_to_vllm_mapper`` prefixes, first match wins:
#: Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-OneVision and Gemma 3 use these).
VLLM_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def _vllm_name(name: str) -> str:
    for old, new in VLLM_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _vision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in model.state_dict().items() if any(p in k for p in UNQUANTIZED_PARTS)}


def _packed_names(model: nn.Module) -> list[tuple[str, TLQLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TLQLinear)]


def _quantized(path, **cfg) -> nn.Module:
    dtype = cfg.pop("dtype", torch.float32)
    cfg.setdefault("method", "rtn")  # format tests: the solver does not matter, RTN is fastest
    return auto_class().from_pretrained(path, quantization_config=TLQConfig(**cfg), dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_reload_compressed_tensors(family, tiny_vlm_dirs, batch_for, tmp_path):
    path, batch = tiny_vlm_dirs[family], batch_for(family)
    fp = auto_class().from_pretrained(path, dtype=torch.float32)
    q = _quantized(path, bits=4, group_size=128)

    # decoder linears packed, everything else (vision tower, projector, lm_head) untouched
    stack = find_decoder_stack(q)
    packed = {n for n, m in q.named_modules() if isinstance(m, TLQLinear)}
    assert packed and all(n.startswith(stack.path + ".") for n in packed)
    assert not any(isinstance(m, nn.Linear) for m in stack.layers.modules())
    fp_state, q_state = fp.state_dict(), q.state_dict()
    for key, value in fp_state.items():
        if not key.startswith(stack.path):
            assert torch.equal(q_state[key], value), key

    ref, out = logits_of(fp, batch), logits_of(q, batch)
    metrics = compare_logits(ref, out, batch["attention_mask"])
    print(f"\n{family} W4A16-g128 vs FP: {metrics}")
    assert 1e-4 < metrics.rel_error < 0.5

    q.save_pretrained(tmp_path / "ct")
    saved = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors" and saved["format"] == "pack-quantized"
    assert all(p.startswith("re:") for p in saved["ignore"])
    # the ignore list picks exactly the full-precision linears, by transformers' names and by vLLM's
    linears = {n: isinstance(m, TLQLinear) for n, m in q.named_modules() if isinstance(m, (nn.Linear, TLQLinear))}
    for name, is_packed in linears.items():
        for view in (name, _vllm_name(name)):
            assert matches_any(view, saved["ignore"]) != is_packed, (view, saved["ignore"])

    ratio_stats = linear_bytes_on_disk(tmp_path / "ct", r"^(?!.*(vision|visual)).*layers\.\d+\.(self_attn|mlp)\.")
    ratio = ratio_stats["stored"] / (2 * ratio_stats["weights"])
    print(f"{family} decoder weight bytes on disk / bf16: {ratio:.3f}")
    assert ratio <= 0.32

    reloaded = _reload_without_plugin(str(tmp_path / "ct"), batch, str(tmp_path / "ct_logits.pt"))
    rel = float((reloaded["logits"] - out).norm() / out.norm())
    print(f"{family} compressed-tensors reload (no plugin) vs in-memory: rel diff {rel:.2e}")
    assert rel <= 1e-4
    vision_fp = _vision_state(fp)
    assert vision_fp and len(reloaded["vision"]) == len(vision_fp)
    for (k_fp, v_fp), v_re in zip(sorted(vision_fp.items()), [v for _, v in sorted(reloaded["vision"].items())]):
        assert torch.equal(v_fp, v_re), f"vision / projector weight {k_fp} changed on reload"


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_reload_native(family, tiny_vlm_dirs, batch_for, tmp_path):
    path, batch = tiny_vlm_dirs[family], batch_for(family)
    q = _quantized(path, bits=3, group_size=128, sym=False, save_format="tlq")
    out = logits_of(q, batch)
    q.save_pretrained(tmp_path / "native")
    saved = json.loads((tmp_path / "native" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "tlq" and saved["bits"] == 3

    reloaded = auto_class().from_pretrained(tmp_path / "native", dtype=torch.float32)
    assert isinstance(reloaded.hf_quantizer.quantization_config, TLQConfig)
    for name, module in q.named_modules():
        if isinstance(module, TLQLinear):
            again = reloaded.get_submodule(name)
            assert isinstance(again, TLQLinear) and torch.equal(again.codes(), module.codes())
    assert torch.equal(logits_of(reloaded, batch), out)


@pytest.mark.parametrize("scheme", ["W3A16-g128", "W2A16-g64", "W8A8", "W4A8"])
def test_every_scheme_round_trips_without_plugin(scheme, tiny_vlm_dirs, batch_for, tmp_path, monkeypatch):
    from tlq_hf.nn import kernels

    # the in-memory model on the reference path, as transformers computes the reload: the comparison is then
    # exact (a W8A8 layer would otherwise run _int_mm, whose exact integer product differs from the float
    # one by rounding, which a downstream activation rounding can amplify: 4.7e-4; tests/test_kernels.py)
    monkeypatch.setattr(kernels, "KERNELS", {})
    family = "qwen2_vl" if scheme in ("W3A16-g128", "W8A8") else "llava"
    path, batch = tiny_vlm_dirs[family], batch_for(family)
    q = _quantized(path, **SCHEMES[scheme])
    out = logits_of(q, batch)
    fp = logits_of(auto_class().from_pretrained(path, dtype=torch.float32), batch)
    print(f"\n{family} {scheme} vs FP: {compare_logits(fp, out, batch['attention_mask'])}")
    q.save_pretrained(tmp_path / "ct")
    fmt = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"]
    assert fmt == ("int-quantized" if "A8" in scheme else "pack-quantized")
    reloaded = _reload_without_plugin(str(tmp_path / "ct"), batch, str(tmp_path / "logits.pt"))
    assert float((reloaded["logits"] - out).norm() / out.norm()) <= 1e-4


@pytest.mark.parametrize("save_format", ["compressed-tensors", "tlq"])
def test_bfloat16_and_device_map_auto(save_format, tiny_vlm_dirs, batch_for, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", {})  # format exactness: the reference path (kernels: test_kernels.py)
    path, batch = tiny_vlm_dirs["qwen2_5_vl"], batch_for("qwen2_5_vl")
    q = _quantized(path, bits=4, group_size=128, save_format=save_format, dtype=torch.bfloat16)
    packed = [m for m in q.modules() if isinstance(m, TLQLinear)]
    assert packed and all(m.weight_scale.dtype == torch.bfloat16 for m in packed)
    out = logits_of(q, batch)
    q.save_pretrained(tmp_path / "bf16")
    if save_format == "tlq":
        reloaded = auto_class().from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, device_map="auto")
        assert all(isinstance(m, TLQLinear) for m in [reloaded.get_submodule(n) for n, _ in _packed_names(q)])
        again = logits_of(reloaded, batch)
    else:
        again = _reload_without_plugin(
            str(tmp_path / "bf16"), batch, str(tmp_path / "logits.pt"), dtype="bfloat16", device_map="auto"
        )["logits"]
    assert float((again - out).norm() / out.norm()) <= 1e-4
