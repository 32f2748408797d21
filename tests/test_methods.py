"""Every method runs on every tiny family and scheme; TLQ beats RTN on held-out answer KL at W3."""

from __future__ import annotations

import pytest
import torch
from _helpers import FAMILIES, auto_class
from transformers import AutoProcessor

from tlq_hf import TLQConfig
from tlq_hf.data import build_calibration_set
from tlq_hf.evaluation import answer_metrics
from tlq_hf.methods import METHODS
from tlq_hf.nn import TLQLinear
from tlq_hf.testing.tiny_models import sample_rows

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


def test_asymmetric_gptq_keeps_the_full_precision_output_better(tiny_vlm_dirs):
    """GPTAQ targets the full-precision layer output from the exposed input. On the trained benchmark LLaVA
    (whose layers carry real incoming error) every layer after the first ends closer to the full-precision
    output than with plain GPTQ (the loop's importance-weighted report, same calibration rows). Without exposed
    inputs the two objectives coincide and so do the weights (tiny model)."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    import vqa_task

    rows = vqa_task.make_items(24, seed=5, split="train")
    errors = {}
    for method in ("gptq", "gptaq"):
        cfg = TLQConfig(method=method, bits=3, group_size=128, dataset=rows, num_samples=24)
        path = bench / "models" / "llava-vqa"
        model = auto_class().from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
        errors[method] = [r.error_after for r in model.tlq_report.layers]
    print(f"\nllava-vqa W3 per-layer weighted output error vs FP: {errors}")
    assert errors["gptaq"][0] == pytest.approx(errors["gptq"][0], rel=1e-3)  # no incoming error at layer 0
    assert all(a < g for a, g in zip(errors["gptaq"][1:], errors["gptq"][1:]))

    weights = {}
    for method in ("gptq", "gptaq"):
        cfg = TLQConfig(method=method, bits=3, group_size=128, exposed=False, dataset=sample_rows(8), num_samples=8)
        model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=cfg, dtype=torch.float32)
        linears = [m for m in model.modules() if isinstance(m, TLQLinear)]
        weights[method] = torch.cat([m.dequantized_weight().flatten() for m in linears])
    same = (weights["gptaq"] == weights["gptq"]).float().mean()
    assert same > 0.99, same
