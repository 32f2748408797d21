"""The already-loaded-model entry points: tlq_hf.quantize and optimum's TLQQuantizer."""

from __future__ import annotations

import torch
from _helpers import auto_class, logits_of
from transformers import AutoProcessor

from tlq_hf import TLQConfig, TLQQuantizer, quantize
from tlq_hf.nn import TLQLinear
from tlq_hf.testing.tiny_models import sample_rows


def test_quantize_loaded_model_equals_quantize_on_load(tiny_vlm_dirs, batch_for, tmp_path):
    path, batch = tiny_vlm_dirs["llava_onevision"], batch_for("llava_onevision")
    cfg = dict(bits=3, dataset=sample_rows(4), num_samples=4)  # method="tlq": gradient importance + GPTQ
    on_load = auto_class().from_pretrained(path, quantization_config=TLQConfig(**cfg))
    loaded = quantize(auto_class().from_pretrained(path), TLQConfig(**cfg))
    assert loaded.tlq_report.layers and loaded.tlq_report.answer_loss is not None
    assert torch.equal(logits_of(loaded, batch), logits_of(on_load, batch))
    loaded.save_pretrained(tmp_path / "q")
    again = auto_class().from_pretrained(tmp_path / "q", dtype="auto")  # 4.57 would default to fp16
    assert torch.equal(logits_of(again, batch), logits_of(on_load, batch))


def test_optimum_quantizer_from_path_saves_model_and_processor(tiny_vlm_dirs, batch_for, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    path, batch = tiny_vlm_dirs["qwen2_vl"], batch_for("qwen2_vl")
    quantizer = TLQQuantizer.from_pretrained(path)
    assert isinstance(quantizer, OptimumQuantizer)
    out = quantizer.quantize(tmp_path / "q", config=TLQConfig(bits=4, method="rtn", save_format="tlq"))
    reloaded = auto_class().from_pretrained(out, dtype="auto")
    assert any(isinstance(m, TLQLinear) for m in reloaded.modules())
    assert torch.equal(logits_of(reloaded, batch), logits_of(quantizer.model, batch))
    AutoProcessor.from_pretrained(out)  # the processor travelled with the weights
