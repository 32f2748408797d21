"""MoE support on tiny random-weight models of transformers' own classes: unfused == fused, quantize on load,
save, reload, and every method on the tiny Qwen3-VL-MoE VLM.

    python benchmarks/moe_smoke.py

Writes benchmarks/results/moe_smoke.json (commit, versions, CPU, timestamps, command). Random weights: these are
plumbing figures (logit agreement, coverage, time, peak RSS), not quality claims.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny MoE builders of the tests

from provenance import Measurement  # noqa: E402
from test_moe import IDS, KINDS, _build, _loader  # noqa: E402

from tlq_hf import TLQConfig  # noqa: E402
from tlq_hf.arch import swap_module  # noqa: E402
from tlq_hf.experts import unfuse_experts  # noqa: E402
from tlq_hf.nn import TLQLinear  # noqa: E402
from tlq_hf.testing.tiny_models import build_tiny_vlm, load_auto_class, make_inputs, sample_images, sample_rows  # noqa: E402


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


@torch.no_grad()
def _forward_ms(model, batch, repeats: int = 15) -> float:
    """Median wall time of one forward, in ms (after two warm-up calls)."""
    for _ in range(2):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[len(times) // 2], 2)


def text_models(root: Path) -> list[dict]:
    rows = []
    timing = {"input_ids": torch.randint(0, 500, (1, 256), generator=torch.Generator().manual_seed(2))}
    for kind in KINDS:
        model = _build(kind)
        batch = {"input_ids": IDS}
        fused = _logits(model, batch)
        fused_ms = _forward_ms(model, timing)
        unfuse_experts(model, "", lambda n, m, model=model: swap_module(model, n, m))
        unfused = _logits(model, batch)
        _build(kind).save_pretrained(root / kind)
        start = time.perf_counter()
        q = _loader(kind).from_pretrained(root / kind, quantization_config=TLQConfig(group_size=64, method="rtn"))
        seconds = time.perf_counter() - start
        expected = _logits(q, batch)
        packed_ms = _forward_ms(q, timing)  # experts packed in memory (what the native format reloads to)
        q.save_pretrained(root / f"{kind}-q")
        reloaded = _logits(_loader(kind).from_pretrained(root / f"{kind}-q"), batch)
        cov = q.tlq_report.coverage
        rows.append(
            {
                "model": kind,
                "unfused_vs_fused_max_abs": _max_diff(unfused, fused),
                "rtn_w4g64_quantize_on_load_s": round(seconds, 2),
                "decoder_quantized_fraction": cov.quantized / cov.total,
                "kept": cov.kept,
                "reload_vs_in_memory_max_abs": _max_diff(reloaded, expected),
                "logit_scale_max_abs": float(expected.abs().max()),
                # one 256-token forward on CPU, same process: fused float32 experts vs packed W4 g64 experts
                "forward_ms_fused_fp32": fused_ms,
                "forward_ms_packed_w4": packed_ms,
                "packed_kernels": sorted(
                    {getattr(m._kernel, "name", "dequantize") for m in q.modules() if isinstance(m, TLQLinear)}
                ),
            }
        )
    return rows


def vlm_methods(root: Path) -> list[dict]:
    path = build_tiny_vlm("qwen3_vl_moe", root / "qwen3_vl_moe")
    auto = load_auto_class()
    processor = transformers.AutoProcessor.from_pretrained(path)
    batch = dict(make_inputs(processor, sample_images(2), ["what is in the picture", "describe the image"]))
    rows = []
    for method in ("rtn", "gptq", "gptaq", "awq", "mbq", "tlq"):
        cfg = TLQConfig(method=method, dataset=sample_rows(16), num_samples=16)
        start = time.perf_counter()
        model = auto.from_pretrained(path, quantization_config=cfg)
        seconds = time.perf_counter() - start
        report = model.tlq_report
        row = {
            "method": method,
            "quantize_on_load_s": round(seconds, 2),
            "summary": report.summary(timing=False),
            "tokens_per_expert": [list(r.expert_tokens.values())[0] for r in report.layers],
            "fallbacks": sum(len(r.fallbacks) for r in report.layers),
            "layer_error_after": [r.error_after for r in report.layers],
        }
        model.save_pretrained(root / f"vl-{method}")
        reloaded = auto.from_pretrained(root / f"vl-{method}")
        row["reload_vs_in_memory_max_abs"] = _max_diff(_logits(reloaded, batch), _logits(model, batch))
        rows.append(row)
    return rows


def main() -> None:
    measured = Measurement("python benchmarks/moe_smoke.py")
    root = Path(tempfile.mkdtemp())
    record = {"text_models": text_models(root), "qwen3_vl_moe_methods": vlm_methods(root)}
    record = {**measured.record(), **record}
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = HERE / "results" / "moe_smoke.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
