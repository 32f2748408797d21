"""Bad input fails loudly, naming the fix; nothing half-loaded or randomly initialised slips through."""

from __future__ import annotations

import pytest
import torch
from _helpers import auto_class
from safetensors.torch import load_file, save_file
from torch import nn

from tlq_hf import TLQConfig, quantize
from tlq_hf.arch import NoDecoderStackError, find_decoder_stack
from tlq_hf.formats import CorruptCheckpointError


def test_group_size_not_dividing_in_features_names_layer_and_fix(tiny_vlm_dirs):
    with pytest.raises(ValueError, match=r"in_features=256 is not divisible by group_size=96.*group_size=-1"):
        auto_class().from_pretrained(tiny_vlm_dirs["qwen2_vl"], quantization_config=TLQConfig(group_size=96))


def test_model_without_decoder_stack():
    with pytest.raises(NoDecoderStackError, match="no text config"):
        find_decoder_stack(nn.Sequential(nn.Linear(4, 4)))


def test_decoder_stack_not_found_names_the_escape_hatch(tiny_vlm_dirs):
    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"])
    model.config.get_text_config(decoder=True).num_hidden_layers = 7
    with pytest.raises(NoDecoderStackError, match="ARCH_FACTS"):
        quantize(model, TLQConfig())


def test_ignore_everything_is_an_error(tiny_vlm_dirs):
    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"])
    with pytest.raises(ValueError, match="No linear layer selected"):
        quantize(model, TLQConfig(ignore=["re:.*"]))


@pytest.fixture(scope="module")
def native_checkpoint(tiny_vlm_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    model = auto_class().from_pretrained(
        tiny_vlm_dirs["qwen2_vl"], quantization_config=TLQConfig(method="rtn", save_format="tlq")
    )
    model.save_pretrained(out)
    return out


def _corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    key = next(k for k in state if k.endswith("layers.1.mlp.down_proj.weight_packed"))
    edit(state, key)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s, k: s.pop(k), "weight_packed: missing from the checkpoint"),
        (lambda s, k: s.pop(k.replace("packed", "scale")), "weight_scale: missing from the checkpoint"),
        (lambda s, k: s.__setitem__(k, s[k][:, :-1].contiguous()), r"\(256, 63\) I32 in the checkpoint"),
        (lambda s, k: s.__setitem__(k, s[k].to(torch.int64)), "I64 in the checkpoint"),
        (lambda s, k: s[k.replace("packed", "scale")].__setitem__((0, 0), float("nan")), "non-finite"),
    ],
    ids=["missing-packed", "missing-scale", "mis-shaped", "wrong-dtype", "nan-scale"],
)
def test_corrupt_native_checkpoint_is_refused(native_checkpoint, tmp_path, edit, message):
    broken = _corrupt(native_checkpoint, tmp_path / "broken", edit)
    with pytest.raises(CorruptCheckpointError, match=message):
        auto_class().from_pretrained(broken, ignore_mismatched_sizes=True)


def test_quantizing_twice_is_refused(tiny_vlm_dirs):
    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=TLQConfig(method="rtn"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, TLQConfig(method="rtn"))


def test_calibrating_method_without_data_says_how_to_fix(tiny_vlm_dirs):
    with pytest.raises(ValueError, match=r"pass TLQConfig\(dataset=...\).*method='rtn'"):
        auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=TLQConfig(method="tlq"))


def test_truncated_native_checkpoint_is_refused(native_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(native_checkpoint, broken)
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # transformers 5 reaches our validation first (it names the file); 4.57 reads the header itself and fails there
    with pytest.raises(Exception, match=r"model.safetensors is not a complete safetensors file|incomplete metadata"):
        auto_class().from_pretrained(broken)


def test_truncated_default_checkpoint_never_loads(tiny_vlm_dirs, tmp_path):
    """The compressed-tensors checkpoint is read by transformers itself: a torn file is an error there too."""
    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=TLQConfig(method="rtn"))
    model.save_pretrained(tmp_path / "ct")
    path = tmp_path / "ct" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(Exception, match=r"(?i)safetensors|deserializ|incomplete|buffer"):
        auto_class().from_pretrained(tmp_path / "ct")


def test_native_checkpoint_without_tlq_hf_is_loud_and_the_default_format_needs_nothing(native_checkpoint, tmp_path):
    """Stock transformers cannot be made to refuse an unknown ``quant_method``: it warns and loads the rest. So the
    native format's card and its load report say it loudly, and the default format reloads without tlq_hf."""
    import subprocess
    import sys

    code = (
        "import sys, transformers\n"
        "cls = getattr(transformers, 'AutoModelForImageTextToText', None) or transformers.AutoModelForVision2Seq\n"
        f"cls.from_pretrained({str(native_checkpoint)!r})\n"
        "assert 'tlq_hf' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Unknown quantization type, got tlq" in out or "unknown quantization type" in out.lower(), out[-2000:]
    assert "weight_packed" in out and ("MISSING" in out or "newly initialized" in out), out[-2000:]
    card = (native_checkpoint / "README.md").read_text()
    assert "import tlq_hf" in card


def test_an_architecture_transformers_cannot_reload_is_refused_before_any_change(tiny_vlm_dirs, monkeypatch):
    """A type listed in ``RELOAD_FAILURES`` for the chosen format is refused up front, naming the reason and the
    format that reloads; the model is left as it was."""
    from tlq_hf.formats import reload_failures as rf

    model = auto_class().from_pretrained(tiny_vlm_dirs["qwen2_vl"], dtype=torch.float32)
    model_type = model.config.model_type
    table = {rf._major(): {"compressed-tensors": {model_type: "a conversion fault"}}}
    monkeypatch.setattr(rf, "RELOAD_FAILURES", table)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{model_type}: .* cannot reload .*a conversion fault.*save_format='tlq'"):
        quantize(model, TLQConfig(method="rtn"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    table[rf._major()]["tlq"] = {model_type: "another fault"}
    with pytest.raises(ValueError, match="no format tlq_hf writes reloads"):
        quantize(model, TLQConfig(method="rtn"))
