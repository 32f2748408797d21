"""Model card and Hub upload: every saving path writes the card; the upload is checked offline.

The Hub client is intercepted (``HfApi.create_repo`` / ``upload_folder``): the test sees exactly the files
that would be uploaded, lays them out as a Hub cache and loads them back with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import auto_class
from huggingface_hub import HfApi, ModelCard
from transformers import AutoProcessor

from tlq_hf import TLQConfig
from tlq_hf.api import TLQQuantizer
from tlq_hf.cli import quantize_main
from tlq_hf.testing.tiny_models import sample_rows

REPO = "tlq-test/tiny-llava-w4"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Intercepted Hub: ``uploads`` collects ``(repo_id, {relative path: bytes})`` per commit."""
    uploads: list[tuple[str, dict[str, bytes]]] = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        uploads.append((repo_id, files))
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def _quantized(tiny_vlm_dirs, **kw):
    cfg = TLQConfig(bits=4, group_size=128, dataset=sample_rows(6), num_samples=6, **kw)
    return auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=cfg, dtype=torch.float32)


def test_save_pretrained_writes_a_card_that_round_trips(tiny_vlm_dirs, tmp_path):
    model = _quantized(tiny_vlm_dirs)
    model.config._name_or_path = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"  # as if loaded from the Hub
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    meta = card.data.to_dict()
    assert (
        meta["base_model"] == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" and meta["base_model_relation"] == "quantized"
    )
    assert {"tlq", "quantized", "4-bit", "W4A16-g128", "compressed-tensors"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    text = card.text
    report = model.tlq_report
    assert f"{report.samples} rows, {report.tokens} tokens: {report.vision_tokens} image" in text
    assert 0 < report.vision_tokens < report.tokens and 0 < report.answer_tokens < report.tokens
    assert "`fisher` at the `gold` labels" in text and "| 1 |" in text  # importance and the per-layer table
    assert "vllm serve" in text and "AutoModelForImageTextToText.from_pretrained" in text
    assert ModelCard(str(card)).data.to_dict() == meta  # re-parsed from its own text: the same metadata


def test_tlq_quantizer_and_cli_write_the_card(tiny_vlm_dirs, tmp_path):
    out = TLQQuantizer.from_pretrained(tiny_vlm_dirs["llava"]).quantize(tmp_path / "a", config=TLQConfig(method="rtn"))
    assert "tlq" in ModelCard.load(out / "README.md").data.tags
    assert (
        quantize_main([tiny_vlm_dirs["llava"], "--out", str(tmp_path / "b"), "--method", "rtn", "--format", "tlq"]) == 0
    )
    card = ModelCard.load(tmp_path / "b" / "README.md")
    assert "tlq-native" in card.data.tags and "import tlq_hf" in card.text


def test_push_to_hub_uploads_card_weights_config_and_processor_offline(tiny_vlm_dirs, tmp_path, hub):
    model = _quantized(tiny_vlm_dirs)
    processor = AutoProcessor.from_pretrained(tiny_vlm_dirs["llava"])
    assert model.push_to_hub(REPO, processor=processor, tags=["my-tag"]) == "commit-url"
    ((repo, files),) = hub
    assert repo == REPO
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert "my-tag" in card.data.tags and f'from_pretrained("{REPO}")' in card.text
    quant = json.loads(files["config.json"])["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"

    # the uploaded files as a Hub cache, loaded back offline in a fresh process
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    batch = processor(images=sample_rows(1)[0]["image"], text="<image> what is in the picture", return_tensors="pt")
    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch
from transformers import AutoProcessor
from tlq_hf.arch import load_auto_class
model = load_auto_class().from_pretrained({REPO!r}, dtype=torch.float32)
AutoProcessor.from_pretrained({REPO!r})
batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
with torch.no_grad():
    got = model(**batch).logits
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(cache)


def test_cli_push_to_hub(tiny_vlm_dirs, tmp_path, hub):
    argv = [tiny_vlm_dirs["llava"], "--out", str(tmp_path / "q"), "--method", "rtn", "--push-to-hub", REPO]
    assert quantize_main(argv) == 0
    ((repo, files),) = hub
    assert repo == REPO and {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(files)


def test_save_pretrained_push_to_hub_flag_is_refused(tiny_vlm_dirs, tmp_path):
    model = _quantized(tiny_vlm_dirs, method="rtn")
    with pytest.raises(ValueError, match="model.push_to_hub"):
        model.save_pretrained(tmp_path, push_to_hub=True)
