"""Choose GPTQ damping, activation order and TLQ importance tempering on a development split (not held-out).

    python benchmarks/tune_dev.py        # both trained models, W3A16-g128 and W2A16-g64

Calibration rows are those of calibration seed 0 of `quality.py` (a subset of the training pool); the
development items are a separate stream of the *train* split (seed ``DEV_SEED``), disjoint from the pool,
from the models' training items and from the held-out test split that the quality table reports. Each
grid point quantizes in-process and is scored by first-answer-token KL(FP || quantized) and flip rate on the
development items. Writes benchmarks/results/tune_dev.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402

import tlq_hf  # noqa: E402,F401  registers quant_method "tlq"
from tlq_hf import TLQConfig  # noqa: E402
from tlq_hf.tiny_models import load_auto_class  # noqa: E402

DEV_SEED, DEV_ITEMS = 4321, 1000
DAMPS = (0.01, 0.1)
GAMMAS = (0.5, 1.0)
ACT_ORDERS = (False, True)
SCHEMES = ("W3A16-g128", "W2A16-g64")


def grid() -> list[tuple[str, dict]]:
    """(label, TLQConfig overrides): plain GPTQ per damp x act order, TLQ per damp x gamma x act order."""
    points = [
        (f"gptq damp={d} act_order={o}", dict(method="gptq", damp=d, act_order=o))
        for d, o in itertools.product(DAMPS, ACT_ORDERS)
    ]
    points += [
        (f"tlq damp={d} gamma={g} act_order={o}", dict(method="tlq", damp=d, gamma=g, act_order=o))
        for d, g, o in itertools.product(DAMPS, GAMMAS, ACT_ORDERS)
    ]
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(quality.MODELS))
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = quality.calibration_rows(0)
    records = []
    start = time.time()
    for model_name in args.models:
        path = HERE / "models" / model_name
        ev = quality.Evaluator(str(path), DEV_ITEMS, seed=DEV_SEED, split="train")
        ref = ev.logprobs(load_auto_class().from_pretrained(path, dtype=torch.float32))
        for scheme, (label, overrides) in itertools.product(args.schemes, grid()):
            cfg = TLQConfig(dataset=rows, num_samples=quality.NUM_SAMPLES, **quality.SCHEMES[scheme], **overrides)
            model = load_auto_class().from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
            m = ev.metrics(ref, ev.logprobs(model))
            records.append(dict(model=model_name, scheme=scheme, point=label, **overrides, **m))
            print(f"{model_name} {scheme} {label}: KL {m['kl']:.3e} flips {1 - m['agreement']:.2%}", flush=True)
    out = HERE / "results"
    previous = out / "tune_dev.json"
    if previous.exists():  # keep the other models' records, so models can be tuned one run at a time
        records = [r for r in json.loads(previous.read_text()) if r["model"] not in args.models] + records
    previous.write_text(json.dumps(records, indent=1))
    models = list(dict.fromkeys(r["model"] for r in records))
    lines = [
        "# Development-split choice of damp and gamma",
        "",
        f"Command: `python benchmarks/tune_dev.py` ({(time.time() - start) / 60:.1f} min). Calibration seed 0 "
        f"({quality.NUM_SAMPLES} rows of the training pool); {DEV_ITEMS} development items from the train split, "
        f"seed {DEV_SEED} (not the held-out test split). First-answer-token KL(FP || quantized), mean over models "
        "and schemes in the last columns.",
        "",
        "| point | " + " | ".join(f"{m} {s}" for m in models for s in args.schemes) + " | mean KL | mean flips |",
        "|---|" + "---|" * (len(models) * len(args.schemes) + 2),
    ]
    for label, _ in grid():
        cells, kls, flips = [], [], []
        for model_name, scheme in itertools.product(models, args.schemes):
            r = next(x for x in records if (x["model"], x["scheme"], x["point"]) == (model_name, scheme, label))
            cells.append(f"{r['kl']:.2e} / {1 - r['agreement']:.1%}")
            kls.append(r["kl"])
            flips.append(1 - r["agreement"])
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {statistics.fmean(kls):.2e} | {statistics.fmean(flips):.2%} |"
        )
    (out / "tune_dev.md").write_text("\n".join(lines) + "\n")
    print(out / "tune_dev.md")


if __name__ == "__main__":
    main()
