"""The README's quality summary, generated from ``results/quality.json`` (never typed).

Per scheme: the models and the commit(s) its table records were made at, and the geometric mean (with the range
over models) of TLQ's answer KL divided by plain GPTQ's (tlq_hf), llm-compressor GPTQ's and llm-compressor AWQ's,
from the per-model ratios ``quality.py`` computed with paired-bootstrap intervals.

    python benchmarks/quality_summary.py        # rewrite the README block from results/quality.json
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- quality-summary -->", "<!-- /quality-summary -->"
#: the TLQ row of the table (the default method: gradient importance, GPTQ solver) and what it is divided by
TLQ = "tlq-gptq"
BASELINES = (("gptq", "plain GPTQ (tlq_hf)"), ("llmc-gptq", "llm-compressor GPTQ"), ("llmc-awq", "llm-compressor AWQ"))
#: the order the schemes are listed in (others follow in the order the records hold them)
ORDER = (
    "W4A16-g128",
    "W3A16-g128",
    "W2A16-g64",
    "W3A16-ch",
    "W4A8",
    "W8A8",
    "NVFP4A16",
    "NVFP4",
    "MXFP4A16",
    "FP8_DYNAMIC",
)


def geomean(values: Iterable[float]) -> float:
    """The geometric mean of positive ``values`` (the benchmarks' one definition of it)."""
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summary(quality: dict) -> str:
    """The markdown block: one row per scheme of the table records in ``quality`` (``quality.json``'s content)."""
    table = [r for r in quality["records"] if r["method"] != "fp" and r.get("phase") != "timing"]
    seen = list(dict.fromkeys(r["scheme"] for r in table))
    schemes = [s for s in ORDER if s in seen] + [s for s in seen if s not in ORDER]
    lines = [
        "Generated from `benchmarks/results/quality.json` by `python benchmarks/quality_summary.py`: geometric mean "
        f"over the models of TLQ's answer KL (`{TLQ}`) divided by each baseline's, the range over models in "
        "brackets; per-model ratios with bootstrap intervals in `benchmarks/results/RESULTS.md`.",
        "",
        "| scheme | models | records' commit | " + " | ".join(f"TLQ / {label}" for _, label in BASELINES) + " |",
        "|---|---|---|" + "---|" * len(BASELINES),
    ]
    for scheme in schemes:
        records = [r for r in table if r["scheme"] == scheme]
        models = sorted({r["model"] for r in records})
        commits = sorted({r.get("commit", "")[:7] or "before provenance" for r in records})
        cells = []
        for den, _ in BASELINES:
            ratios = [
                r["kl_ratio"]
                for r in quality["ratios"]
                if r["scheme"] == scheme and r["numerator"] == TLQ and r["denominator"] == den and r["kl_ratio"]
            ]
            if not ratios:
                peer_ran = any(r["library"] == "llm-compressor" for r in records)
                cells.append("not run" if peer_ran or not den.startswith("llmc") else "no preset")
                continue
            cells.append(f"{geomean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} models)")
        lines.append(f"| {scheme} | {len(models)} | {', '.join(commits)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(quality: dict, readme: Path = README) -> None:
    """Replace the README block between :data:`BEGIN` and :data:`END` by :func:`summary`."""
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{summary(quality)}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    write(json.loads((RESULTS / "quality.json").read_text()))
