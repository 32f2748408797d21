"""Security: no pickle anywhere we read or write, no remote code, dataset paths confined (see test_data.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from _helpers import auto_class
from safetensors import safe_open

from tlq_hf import TLQConfig
from tlq_hf.testing.tiny_models import sample_rows

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("src", "benchmarks", "examples", "tests") for p in (ROOT / d).rglob("*.py"))
SAFE_SUFFIXES = {".safetensors", ".json", ".md", ".jinja", ".txt", ".model"}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_in_the_sources(path):
    for call in _calls(path):
        name = ast.unparse(call.func)
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name.endswith("torch.load"):
            assert keywords.get("weights_only") == "True", f"{path}:{call.lineno}: torch.load without weights_only=True"
        assert not name.startswith(("pickle.", "dill.", "cloudpickle.")), f"{path}:{call.lineno}: {name}"
        assert keywords.get("trust_remote_code") not in ("True",), f"{path}:{call.lineno}: trust_remote_code=True"
    if "src" in path.parts:
        imports = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        assert not imports & {"pickle", "dill", "cloudpickle", "marshal"}, path


@pytest.mark.parametrize("save_format", ["compressed-tensors", "tlq"])
def test_everything_we_write_is_safetensors_or_text(tiny_vlm_dirs, tmp_path, save_format):
    cfg = TLQConfig(dataset=sample_rows(4), num_samples=4, save_format=save_format, checkpoint_dir=tmp_path / "ckpt")
    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], dtype=torch.float32, quantization_config=cfg)
    model.save_pretrained(tmp_path / "out")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    unsafe = [p for p in written if p.suffix not in SAFE_SUFFIXES]
    assert not unsafe, unsafe
    for p in written:  # and none of them is a pickle in disguise (protocol 2+ starts with 0x80)
        if p.suffix == ".safetensors":
            with safe_open(p, "pt") as f:  # a valid safetensors file (its first bytes are a length)
                assert list(f.keys())
        else:
            assert not p.read_bytes()[:1] == b"\x80", p
    auto_class().from_pretrained(tmp_path / "out", trust_remote_code=False)  # no remote code needed
