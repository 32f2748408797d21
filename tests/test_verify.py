"""``python -m tlq_hf verify``: a checkpoint naming a scheme we do not write, or with broken tensors, is refused
naming the config entry or the tensor; every checkpoint we write passes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers import auto_class
from safetensors.torch import load_file, save_file

from tlq_hf import TLQConfig
from tlq_hf.cli import main
from tlq_hf.formats import CorruptCheckpointError
from tlq_hf.formats.verify import UnsupportedSchemeError, verify_checkpoint
from tlq_hf.nn import TLQLinear


@pytest.fixture(scope="module")
def checkpoints(tiny_vlm_dirs, tmp_path_factory):
    out = {}
    for name, kw in {
        "ct-w4": dict(bits=4, group_size=32),
        "ct-w3-channel": dict(bits=3, group_size=-1),
        "ct-w8a8": dict(bits=8, group_size=-1, act_bits=8),
        "native-asym": dict(bits=4, group_size=32, sym=False, save_format="tlq"),
        "native-w2": dict(bits=2, group_size=64, save_format="tlq"),
    }.items():
        model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=TLQConfig(method="rtn", **kw))
        out[name] = (tmp_path_factory.mktemp(name), sum(isinstance(m, TLQLinear) for m in model.modules()))
        model.save_pretrained(out[name][0])
    return out


@pytest.mark.parametrize("name", ["ct-w4", "ct-w3-channel", "ct-w8a8", "native-asym", "native-w2"])
def test_every_checkpoint_we_write_verifies(checkpoints, name, capsys):
    folder, modules = checkpoints[name]
    found = verify_checkpoint(folder)
    assert found.modules == modules and found.files == 1
    assert main(["verify", str(folder)]) == 0 and "OK:" in capsys.readouterr().out


def _copy(src, dst, config_edit=None, tensor_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        state = load_file(dst / "model.safetensors")
        key = next(k for k in state if k.endswith("layers.1.mlp.down_proj.weight_scale"))
        tensor_edit(state, key.removesuffix(".weight_scale"))
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _group(qc):
    return qc["config_groups"]["group_0"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda qc: _group(qc)["weights"].update(type="float"),
            r"group_0.weights.scale_dtype: None",
        ),  # MXFP4 wants E8M0
        (lambda qc: _group(qc)["weights"].update(num_bits=6), r"weights.num_bits: 6"),
        (lambda qc: _group(qc)["weights"].update(actorder="group"), r"weights.actorder: 'group'"),
        (lambda qc: _group(qc)["weights"].update(strategy="tensor"), r"weights.strategy: 'tensor'"),
        (
            lambda qc: _group(qc).update(
                input_activations={"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}
            ),
            r"input_activations.num_bits|input_activations.strategy: 'tensor'",
        ),
        (lambda qc: qc.update(format="float-quantized"), r"quantization_config.format: 'float-quantized'"),
        (lambda qc: qc["config_groups"].update(group_1=qc["config_groups"]["group_0"]), r"2 groups"),
        (lambda qc: qc.update(quant_method="awq"), r"quant_method: 'awq'"),
    ],
    ids=["float", "6-bit", "actorder-group", "per-tensor", "static-acts", "format", "two-groups", "other-method"],
)
def test_a_scheme_we_do_not_write_is_refused_naming_the_entry(checkpoints, tmp_path, edit, message):
    broken = _copy(checkpoints["ct-w4"][0], tmp_path / "b", config_edit=edit)
    with pytest.raises(UnsupportedSchemeError, match=message):
        verify_checkpoint(broken)
    assert main(["verify", str(broken)]) == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda qc: _group(qc)["weights"].update(num_bits=8), r"packed: \(256, 64\) I32, expected \(256, 128\)"),
        (lambda qc: _group(qc)["weights"].update(group_size=64), r"scale: \(256, 16\) \w+, expected \(256, 8\)"),
    ],
)
def test_a_config_that_does_not_fit_the_tensors_names_them(checkpoints, tmp_path, edit, message):
    broken = _copy(checkpoints["ct-w4"][0], tmp_path / "b", config_edit=edit)
    with pytest.raises(CorruptCheckpointError, match=message):
        verify_checkpoint(broken)


@pytest.mark.parametrize("name", ["ct-w4", "native-asym"])
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s, p: s[p + ".weight_scale"].__setitem__((0, 0), float("inf")), r"weight_scale: non-finite"),
        (lambda s, p: s.pop(p + ".weight_packed"), r"down_proj.weight_packed: missing"),
        (lambda s, p: s.__setitem__(p + ".weight_packed", s[p + ".weight_packed"][:, :-1].clone()), "packed: [(]"),
        (lambda s, p: s.__setitem__(p + ".weight_scale", s[p + ".weight_scale"].to(torch.int32)), "scale: .* I32"),
    ],
    ids=["inf-scale", "missing-packed", "mis-shaped", "int-scale"],
)
def test_broken_tensors_are_named(checkpoints, tmp_path, name, edit, message):
    broken = _copy(checkpoints[name][0], tmp_path / "b", tensor_edit=edit)
    with pytest.raises(CorruptCheckpointError, match=message):
        verify_checkpoint(broken)


def test_a_truncated_file_is_named(checkpoints, tmp_path):
    broken = _copy(checkpoints["ct-w4"][0], tmp_path / "b")
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is not a complete safetensors file"):
        verify_checkpoint(broken)
