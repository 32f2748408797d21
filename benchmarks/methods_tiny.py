"""Every method on the four tiny random-weight VLM families: held-out answer-token KL and time split.

    python benchmarks/methods_tiny.py [--schemes W3A16-g128 ...] [--samples 32]

Writes benchmarks/results/methods_tiny.{md,json}. Random-weight models: this checks the pipeline ranks
methods sensibly on real architectures; quality claims come from the trained benchmark models.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import Measurement  # the script's own folder is on sys.path
from transformers import AutoProcessor

from tlq_hf import TLQConfig
from tlq_hf.data import build_calibration_set
from tlq_hf.evaluation import answer_metrics
from tlq_hf.testing.tiny_models import FAMILIES, build_tiny_vlm, load_auto_class, sample_rows

SCHEMES = {
    "W4A16-g128": dict(bits=4, group_size=128),
    "W3A16-g128": dict(bits=3, group_size=128),
    "W8A8": dict(bits=8, group_size=-1, act_bits=8),
    "W4A8": dict(bits=4, group_size=128, act_bits=8),
}
ROWS = [
    ("rtn", {}),
    ("smoothquant", {}),
    ("awq", {}),
    ("mbq", {}),
    ("gptq", {}),
    ("tlq", {}),
    ("tlq", {"solver": "awq"}),
    ("tlq", {"importance": "uniform"}),
    ("tlq", {"importance": "l1"}),
    ("tlq", {"gamma": 1.0}),
    ("tlq", {"token_fraction": 0.5}),
    ("tlq", {"exposed": False}),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--schemes", nargs="*", default=["W3A16-g128"])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="GPTQ activation order (the published table predates the act_order=True default: off)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_tiny"))
    args = p.parse_args()
    measured = Measurement("python benchmarks/methods_tiny.py " + " ".join(sys.argv[1:]))
    auto, records = load_auto_class(), []
    root = Path(tempfile.mkdtemp())
    for family in FAMILIES:
        path = build_tiny_vlm(family, root / family)
        fp = auto.from_pretrained(path, dtype=torch.float32)
        held = build_calibration_set(sample_rows(24, seed=1), AutoProcessor.from_pretrained(path), 24, seed=7)
        for scheme in args.schemes:
            for method, extra in ROWS:
                cfg = TLQConfig(
                    method=method,
                    dataset=sample_rows(args.samples),
                    num_samples=args.samples,
                    **SCHEMES[scheme],
                    **({"act_order": args.act_order} | extra),
                )
                start = time.perf_counter()
                model = auto.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
                seconds = time.perf_counter() - start
                m = answer_metrics(fp, model, held)
                label = method + "".join(f" {k}={v}" for k, v in extra.items())
                rec = {
                    "family": family,
                    "scheme": scheme,
                    "method": label,
                    "kl": m.kl,
                    "agreement": m.agreement,
                    "rel_error": m.rel_error,
                    "seconds": seconds,
                    "phases": model.tlq_report.phases,
                }
                records.append(rec)
                print(
                    f"{family:16s} {scheme:11s} {label:28s} KL {m.kl:.3e} agree {m.agreement:6.1%} "
                    f"{seconds:5.1f}s {rec['phases']}",
                    flush=True,
                )
    prov = measured.record()
    records = [r | prov for r in records]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(records, indent=1))
    lines = [
        "# Methods on tiny random-weight VLMs",
        "",
        f"`python benchmarks/methods_tiny.py --schemes {' '.join(args.schemes)} --samples {args.samples}`: "
        f"{args.samples} calibration photo Q/A pairs (`tlq_hf.testing.tiny_models.sample_rows`, seed 0), 24 held-out "
        "pairs (seed 1); held-out answer-token KL vs FP (lower is better) and top-1 agreement. Random weights, "
        "real architectures: a pipeline check, not a quality claim.",
        "",
    ]
    for scheme in args.schemes:
        lines += [
            f"## {scheme}",
            "",
            "| method | " + " | ".join(FAMILIES) + " | time split (last family) |",
            "|---|" + "---|" * (len(FAMILIES) + 1),
        ]
        for method, extra in ROWS:
            label = method + "".join(f" {k}={v}" for k, v in extra.items())
            cells = [r for r in records if r["scheme"] == scheme and r["method"] == label]
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in cells[-1]["phases"].items()) or "-"
            lines.append(
                f"| {label} | " + " | ".join(f"{r['kl']:.2e} ({r['agreement']:.0%})" for r in cells) + f" | {phases} |"
            )
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
