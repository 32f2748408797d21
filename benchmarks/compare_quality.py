"""Compare two ``quality.py`` result folders run on the same models, schemes and seeds (e.g. bf16 calibration with
``--calibration-dtype auto`` against ``float32``): answer-KL ratio and accuracy difference per model and method,
and each method's geometric-mean ratio. Writes ``COMPARE.md`` beside the first folder's parent.

    python benchmarks/compare_quality.py results/bf16_calibration/auto results/bf16_calibration/float32
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from quality_summary import geomean


def _table(folder: Path) -> dict[tuple[str, str, str, int], dict]:
    records = json.loads((folder / "quality.json").read_text())["records"]
    return {(r["model"], r["scheme"], r["method"], r["seed"]): r for r in records if r["method"] != "fp"}


def compare(a: Path, b: Path) -> str:
    """The markdown comparison of the records in folders ``a`` and ``b`` (keys present in both)."""
    ta, tb = _table(a), _table(b)
    keys = sorted(set(ta) & set(tb))
    commits = sorted({ta[k].get("commit", "?")[:7] for k in keys} | {tb[k].get("commit", "?")[:7] for k in keys})
    lines = [
        f"# `{a.name}` vs `{b.name}`",
        "",
        f"Records: `{a}/quality.json` (`{next(iter(ta.values()))['command']}`) and `{b}/quality.json` "
        f"(`{next(iter(tb.values()))['command']}`), commit {', '.join(commits)}. Ratio: answer KL to the "
        f"full-precision model of `{a.name}` / `{b.name}`; accuracy in points.",
        "",
        "| model | scheme | method | seed | KL a | KL b | ratio | accuracy a - b |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {}
    for k in keys:
        ra, rb = ta[k], tb[k]
        ratio = ra["kl"] / rb["kl"] if rb["kl"] > 0 else float("nan")
        ratios.setdefault(k[2], []).append(ratio)
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {ra['kl']:.3e} | {rb['kl']:.3e} | {ratio:.2f} "
            f"| {100 * (ra['accuracy'] - rb['accuracy']):+.2f} |"
        )
    lines += ["", "| method | rows | geometric-mean KL ratio | min | max |", "|---|---|---|---|---|"]
    for method, rs in ratios.items():
        finite = [r for r in rs if r > 0 and math.isfinite(r)]
        lines.append(f"| {method} | {len(finite)} | {geomean(finite):.2f} | {min(finite):.2f} | {max(finite):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    out = args.a.parent / "COMPARE.md"
    out.write_text(compare(args.a, args.b))
    print(out.read_text())


if __name__ == "__main__":
    main()
