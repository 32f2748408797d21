"""Choose TLQ's defaults on the development splits of every benchmark model together (never the held-out split).

    python benchmarks/tune_dev.py                      # every trained model, W3A16-g128 and W2A16-g64
    python benchmarks/tune_dev.py --models llava-vqa   # re-run one model (the others' records are kept)
    python benchmarks/tune_dev.py --combine            # then: every factor at its best value, together

Calibration rows are those of calibration seed 0 of `quality.py` (a subset of each model's training pool);
the development items are a separate stream of the *train* split of the model's task (seed ``DEV_SEED``),
disjoint from the pool, from the models' training items and from the held-out test split the quality table
reports. Each point quantizes in-process and is scored by first-answer-token KL(FP || quantized) and flip
rate on the development items.

The search is one factor at a time around the current defaults (a full grid over the factors and every
model does not fit the machine): plain GPTQ at each ``damp`` x ``act_order`` and plain GPTAQ, then TLQ with
one of ``gamma``, ``importance``, ``importance_clip``, ``damp``, ``act_order``, the importance labels, the
answer tokens, the importance scope and the solver changed; ``--combine`` then measures every factor at its
best value together. The chosen setting is the best-scoring TLQ point measured. Each point's score is the
geometric mean over models and schemes of its KL relative to the default plain GPTQ on the same model and
scheme, so that no single model (whose KL scale may be 10x another's) decides; per-model results are in
the table so that a point that only helps one model shows. Writes benchmarks/results/tune_dev.{json,md}.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
from provenance import Measurement  # noqa: E402
from quality_summary import geomean  # noqa: E402

import tlq_hf  # noqa: E402,F401  registers quant_method "tlq"
from tlq_hf import TLQConfig  # noqa: E402
from tlq_hf.methods import resolve_recipe  # noqa: E402
from tlq_hf.testing.tiny_models import load_auto_class  # noqa: E402

DEV_SEED, DEV_ITEMS = 4321, 1000
SCHEMES = ("W3A16-g128", "W2A16-g64")
#: The defaults the search moves away from, one factor at a time (TLQConfig's own defaults).
_DEFAULTS = TLQConfig()
BASE: dict[str, Any] = {
    "gamma": _DEFAULTS.gamma,
    "importance": "fisher",
    "importance_clip": tuple(_DEFAULTS.importance_clip),
    "damp": _DEFAULTS.damp,
    "act_order": _DEFAULTS.act_order,
    "importance_labels": _DEFAULTS.importance_labels,
    "answer_tokens": _DEFAULTS.answer_tokens,
    "importance_scope": _DEFAULTS.importance_scope,
    "solver": resolve_recipe(_DEFAULTS).solver,
}
#: Alternative values tried for each TLQ factor.
ALTERNATIVES: dict[str, tuple[Any, ...]] = {
    "gamma": (0.25, 1.0),
    "importance": ("l1", "uniform"),
    "importance_clip": ((0.01, 100.0), (0.2, 5.0)),
    "damp": (0.1,),
    "act_order": (not BASE["act_order"],),
    # which gradient (the quality issue's robustness question): the model's own predictive Fisher, the first
    # answer token only, one weight per layer output instead of per module group
    "importance_labels": ("predictive",),
    "answer_tokens": ("first",),
    "importance_scope": ("layer",),
    # the asymmetric objective (GPTAQ): the full-precision output as the target of the exposed input
    "solver": ("gptaq",),
}
REFERENCE = "gptq (default)"
COMBINED = "tlq (combined)"
#: The combination with gold labels: predictive labels take ``importance_topk`` backward passes, which the
#: calibration-time target (<= 1.3x plain GPTQ) may not afford; measured too when the combination uses them.
COMBINED_GOLD = "tlq (combined, gold labels)"


def grid() -> list[tuple[str, dict[str, Any]]]:
    """(label, TLQConfig overrides): plain GPTQ per damp x act_order, TLQ at the defaults and one factor off."""
    points = [(REFERENCE, dict(method="gptq", damp=BASE["damp"], act_order=BASE["act_order"]))]
    for damp, order in itertools.product((0.01, 0.1), (True, False)):
        if (damp, order) != (BASE["damp"], BASE["act_order"]):
            points.append((f"gptq damp={damp} act_order={order}", dict(method="gptq", damp=damp, act_order=order)))
    points.append(("gptaq", dict(method="gptaq", damp=BASE["damp"], act_order=BASE["act_order"])))
    points.append(("tlq (defaults)", dict(method="tlq", **BASE)))
    for factor, values in ALTERNATIVES.items():
        for value in values:
            points.append((f"tlq {factor}={value}", dict(method="tlq", **{**BASE, factor: value})))
    return points


def score(records: list[dict], label: str, model: str | None = None) -> float:
    """Geometric mean over (model, scheme) of the point's KL divided by the reference GPTQ's KL (one model's
    schemes only, with ``model``)."""
    ratios = []
    for r in records:
        if r["point"] != label or (model is not None and r["model"] != model):
            continue
        ref = next(x for x in records if (x["model"], x["scheme"], x["point"]) == (r["model"], r["scheme"], REFERENCE))
        ratios.append(max(r["kl"], 1e-12) / max(ref["kl"], 1e-12))
    return geomean(ratios) if ratios else float("nan")


def _cell(records: list[dict], model: str, scheme: str, label: str) -> str:
    r = next((x for x in records if (x["model"], x["scheme"], x["point"]) == (model, scheme, label)), None)
    return "" if r is None else f"{r['kl']:.2e} / {1 - r['agreement']:.1%}"


def combine(records: list[dict]) -> dict[str, Any]:
    """Each factor at its best-scoring value (the default when no alternative beats it): the ``--combine`` point."""
    chosen = dict(BASE)
    base_score = score(records, "tlq (defaults)")
    for factor, values in ALTERNATIVES.items():
        scored = [(score(records, f"tlq {factor}={v}"), v) for v in values]
        best_score, best = min(scored, key=lambda sv: sv[0])
        if best_score < base_score:
            chosen[factor] = best
    return chosen


def choose(records: list[dict]) -> tuple[str, dict[str, Any]]:
    """The best-scoring TLQ point that was measured (defaults, one factor changed, or the combination) and
    its settings."""
    labels = [label for label in dict.fromkeys(r["point"] for r in records) if label.startswith("tlq")]
    best = min(labels, key=lambda label: score(records, label))
    record = next(r for r in records if r["point"] == best)
    return best, {k: tuple(record[k]) if isinstance(record[k], list) else record[k] for k in BASE}


def write_markdown(records: list[dict], schemes: list[str], wall_min: float) -> Path:
    models = list(dict.fromkeys(r["model"] for r in records))
    labels = list(dict.fromkeys(r["point"] for r in records))
    lines = [
        "# Development-split choice of TLQ's defaults (every benchmark model together)",
        "",
        f"Command: `python benchmarks/tune_dev.py` ({wall_min:.1f} min for the models of the last run). Calibration "
        f"seed 0 ({quality.NUM_SAMPLES} rows of each model's training pool); {DEV_ITEMS} development items from the "
        f"train split of the model's task, seed {DEV_SEED} (not the held-out test split). Cells: first-answer-token "
        "KL(FP || quantized) / flips. Score: geometric mean over models and schemes of KL / the default plain "
        f"GPTQ's KL on the same model and scheme (lower is better; `{REFERENCE}` = 1 by construction).",
        "",
        "| point | score | " + " | ".join(f"{m} {s}" for m in models for s in schemes) + " |",
        "|---|---|" + "---|" * (len(models) * len(schemes)),
    ]
    for label in labels:
        cells = [_cell(records, m, s, label) for m in models for s in schemes]
        lines.append(f"| {label} | {score(records, label):.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per model (geometric mean over schemes of KL / default GPTQ; a point that helps only one model shows here):",
        "",
        "| point | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{score(records, label, m):.3f}" for m in models) + " |")
    label, chosen = choose(records)
    changed = {k: v for k, v in chosen.items() if v != BASE[k]}
    shown = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in chosen.items()})
    lines += [
        "",
        f"Chosen across {len(models)} models: `{label}` (score {score(records, label):.3f}): {shown}"
        + (f" (changed from the defaults: {changed})" if changed else " (the current defaults)."),
        "",
    ]
    path = HERE / "results" / "tune_dev.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(quality.MODELS))
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--combine",
        action="store_true",
        help="only evaluate every factor at its best value together (from the recorded one-factor points)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    previous = HERE / "results" / "tune_dev.json"
    points = grid()
    if args.combine:
        best = combine(json.loads(previous.read_text()))
        points = [(COMBINED, dict(method="tlq", **best))]
        if best["importance_labels"] != "gold":
            points.append((COMBINED_GOLD, dict(method="tlq", **{**best, "importance_labels": "gold"})))
    for model_name in args.models:
        path = HERE / "models" / model_name
        rows = quality.calibration_rows(0, model_name)
        ev = quality.Evaluator(str(path), DEV_ITEMS, quality.task_of(model_name), seed=DEV_SEED, split="train")
        ref = ev.logprobs(load_auto_class().from_pretrained(path, dtype=torch.float32))
        records = []
        measured = Measurement("python benchmarks/tune_dev.py " + " ".join(sys.argv[1:]))
        for scheme, (label, overrides) in itertools.product(args.schemes, points):
            cfg = TLQConfig(dataset=rows, num_samples=quality.NUM_SAMPLES, **quality.SCHEMES[scheme], **overrides)
            model = load_auto_class().from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
            m = ev.metrics(ref, ev.logprobs(model))
            point = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
            records.append(dict(model=model_name, scheme=scheme, point=label, **point, **m))
            print(f"{model_name} {scheme} {label}: KL {m['kl']:.3e} flips {1 - m['agreement']:.2%}", flush=True)
        prov = measured.record()
        merged = merge_records(previous, [r | prov for r in records], replace_model=not args.combine)
    schemes = list(dict.fromkeys(r["scheme"] for r in merged))
    print(write_markdown(merged, schemes, (time.time() - start) / 60))


def merge_records(path: Path, records: list[dict], replace_model: bool) -> list[dict]:
    """Add one model's ``records`` to the file at ``path`` (after each model, so an interrupted search keeps
    what it measured; several searches over different models may run at once: the file is locked while
    merged). Kept from the file: records of this grid (an older grid has no reference point to score
    against) that were not re-measured now; with ``replace_model``, none of the re-tuned model's (its
    combination would be stale)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else []
        labels = {label for label, _ in grid()} | {COMBINED, COMBINED_GOLD}
        current = {(r["model"], r["scheme"]) for r in old + records if r["point"] == REFERENCE}
        ran = {(r["model"], r["point"]) for r in records}
        models = {r["model"] for r in records}
        keep = [
            r
            for r in old
            if r["point"] in labels
            and (r["model"], r["scheme"]) in current
            and (r["model"], r["point"]) not in ran
            and not (replace_model and r["model"] in models)
        ]
        merged = keep + records
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.replace(path)
    return merged


if __name__ == "__main__":
    main()
