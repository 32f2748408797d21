"""The default checkpoint as vLLM's compressed-tensors loader reads it, for every supported family.

vLLM (``compressed_tensors`` quantization) decides per *vLLM* module name whether a layer is quantized:
an ``ignore`` entry ``re:P`` matches when ``re.match(P, name)`` (anchored at the start), any other entry
only when equal to the name; the names are the checkpoint's, remapped by each model's ``hf_to_vllm_mapper``
(regex entries are not remapped), and q/k/v and gate/up are fused (``qkv_proj``, ``gate_up_proj``: every
shard must agree). Here: every vision-tower, projector and ``lm_head`` linear must be ignored and every
decoder linear targeted, under the in-memory names, the names on disk and the vLLM names.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from _helpers import FAMILIES, auto_class
from safetensors import safe_open

from tlq_hf import TLQConfig
from tlq_hf.nn import TLQLinear

#: ``hf_to_vllm_mapper.orig_to_new_prefix`` of vLLM's model class for each family (first match wins), from
#: vllm/model_executor/models/{qwen2_vl,qwen2_5_vl,llava,llava_onevision,gemma3_mm}.py.
_QWEN = {
    "model.language_model.": "language_model.model.",
    "model.visual.": "visual.",
    "lm_head.": "language_model.lm_head.",
    "model.": "language_model.model.",
}
_LLAVA = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
VLLM_PREFIXES = {"qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN, "llava": _LLAVA, "llava_onevision": _LLAVA, "gemma3": _LLAVA}
VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj"}
VLLM_FUSED["up_proj"] = "gate_up_proj"


def vllm_name(name: str, family: str) -> str:
    for old, new in VLLM_PREFIXES[family].items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def vllm_ignores(name: str, ignore: list[str]) -> bool:
    """vLLM's rule: ``re:`` entries by ``re.match``, others by equality."""
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in ignore)


def _fused(name: str) -> str:
    head, _, last = name.rpartition(".")
    return f"{head}.{VLLM_FUSED.get(last, last)}"


@pytest.fixture(scope="module")
def saved(tiny_vlm_dirs, tmp_path_factory):
    """``{family: (in-memory linears {name: quantized}, on-disk linears {name: quantized}, ignore)}``."""
    out = {}
    for family in FAMILIES:
        model = auto_class().from_pretrained(tiny_vlm_dirs[family], quantization_config=TLQConfig(method="rtn"))
        memory = {
            n: isinstance(m, TLQLinear) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, TLQLinear))
        }
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        ignore = json.loads((path / "config.json").read_text())["quantization_config"]["ignore"]
        disk: dict[str, bool] = {}
        for file in path.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    if key.endswith(".weight_packed"):
                        disk[key[: -len(".weight_packed")]] = True
                    elif key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2 and "embed" not in key:
                        disk.setdefault(key[: -len(".weight")], False)
        out[family] = memory, disk, ignore
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_ignore_list_targets_exactly_the_decoder_under_hf_and_vllm_names(family, saved):
    memory, disk, ignore = saved[family]
    assert all(e.startswith("re:") for e in ignore)  # regexes: immune to the key renames (never remapped)
    assert sum(memory.values()) == sum(disk.values()) > 0  # every packed decoder linear is on disk, packed
    tied = sum(1 for n in memory if n.endswith("lm_head")) - sum(1 for n in disk if n.endswith("lm_head"))
    assert len(disk) == len(memory) - tied  # the heuristic found every linear on disk (a tied lm_head is not)
    for names in (memory, disk, {vllm_name(n, family): q for n, q in disk.items()}):
        wrong = {n: q for n, q in names.items() if vllm_ignores(n, ignore) == q}
        assert not wrong, f"{family}: ignore {ignore} disagrees with the packed state of {sorted(wrong)[:4]}"
    for name, quantized in disk.items():  # vLLM's fused layers: every shard agrees with the fused decision
        fused = _fused(vllm_name(name, family))
        assert vllm_ignores(fused, ignore) == (not quantized), fused
    kinds = {n.split(".")[0] for n, q in ((vllm_name(n, family), q) for n, q in disk.items()) if not q}
    assert kinds, f"{family}: no full-precision linear (vision tower, projector) on disk"
    assert all(
        n.startswith("language_model.model.layers.") for n, q in disk.items() if q for n in [vllm_name(n, family)]
    )


def test_writing_three_bit_compressed_tensors_notes_the_vllm_kernels_once(tiny_vlm_dirs, tmp_path, caplog):
    from tlq_hf.formats.compressed_tensors import note_serving_bits

    note_serving_bits.cache_clear()
    model = auto_class().from_pretrained(
        tiny_vlm_dirs["llava"], quantization_config=TLQConfig(method="rtn", bits=3, group_size=128)
    )
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "a")
        model.save_pretrained(tmp_path / "b")
    notes = [r for r in caplog.records if "vLLM's GPU kernels take 4- and 8-bit" in r.getMessage()]
    assert len(notes) == 1
