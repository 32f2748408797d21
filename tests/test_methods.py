"""Every method runs on every tiny family and scheme; TLQ beats RTN on held-out answer KL at W3."""

from __future__ import annotations

import pytest
import torch
from _helpers import FAMILIES, auto_class
from transformers import AutoProcessor

from tlq_hf import TLQConfig
from tlq_hf.config import METHODS
from tlq_hf.data import build_calibration_set, sample_rows
from tlq_hf.evaluation import answer_metrics
from tlq_hf.nn import TLQLinear

SCHEMES = {
    "W4A16-g128": dict(bits=4, group_size=128),
    "W3A16-g128": dict(bits=3, group_size=128),
    "W8A8": dict(bits=8, group_size=-1, act_bits=8),
    "W4A8": dict(bits=4, group_size=128, act_bits=8),
}


@pytest.fixture(scope="module")
def fp_models(tiny_vlm_dirs):
    return {f: auto_class().from_pretrained(tiny_vlm_dirs[f], dtype=torch.float32) for f in FAMILIES}


@pytest.fixture(scope="module")
def held_out(tiny_vlm_dirs):
    """Held-out rows: different questions/photos order than the calibration rows (seed 1 vs 0)."""
    return {
        f: build_calibration_set(sample_rows(12, seed=1), AutoProcessor.from_pretrained(tiny_vlm_dirs[f]), 12, seed=7)
        for f in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_method_runs(family, scheme, tiny_vlm_dirs, fp_models, held_out):
    for method in METHODS:
        cfg = TLQConfig(method=method, dataset=sample_rows(6), num_samples=6, **SCHEMES[scheme])
        model = auto_class().from_pretrained(tiny_vlm_dirs[family], quantization_config=cfg, dtype=torch.float32)
        assert sum(isinstance(m, TLQLinear) for m in model.modules()) == 14, method
        metrics = answer_metrics(fp_models[family], model, held_out[family][:3])
        assert 0 < metrics.kl < 1 and torch.isfinite(torch.tensor(metrics.rel_error)), (method, metrics)
        if method != "rtn":
            report = model.tlq_report
            assert len(report.layers) == 2 and "capture" in report.phases and "layers" in report.phases


@pytest.mark.parametrize("family", FAMILIES)
def test_tlq_beats_rtn_at_w3(family, tiny_vlm_dirs, fp_models, held_out):
    kl = {}
    for method in ("rtn", "gptq", "tlq"):
        cfg = TLQConfig(method=method, bits=3, group_size=128, dataset=sample_rows(32), num_samples=32)
        model = auto_class().from_pretrained(tiny_vlm_dirs[family], quantization_config=cfg, dtype=torch.float32)
        kl[method] = answer_metrics(fp_models[family], model, held_out[family]).kl
    print(f"\n{family} W3A16-g128 held-out answer KL: {kl}")
    assert kl["tlq"] < kl["rtn"]
