"""The architecture sweep's record and the README's support table (``tests/arch_sweep.py`` does the work).

    python benchmarks/support_table.py            # every image-text-to-text class of the installed transformers

Writes ``benchmarks/results/arch_sweep_<major>.json`` (rows, provenance) and replaces the README block between
``<!-- arch-sweep: transformers <major> -->`` and ``<!-- /arch-sweep: transformers <major> -->``; run it once
per transformers line (``.venv`` for 5.x, ``.venv4`` for 4.57). ``tests/test_arch_sweep.py`` runs the same
sweep in the default suite and fails when the README's statuses no longer match it.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import arch_sweep  # noqa: E402
from provenance import Measurement  # noqa: E402

MAJOR = transformers.__version__.split(".")[0]
BEGIN, END = f"<!-- arch-sweep: transformers {MAJOR} -->", f"<!-- /arch-sweep: transformers {MAJOR} -->"


def table(rows: list[arch_sweep.SweepRow]) -> str:
    """The README block's markdown for ``rows`` (statuses are what the test compares)."""
    buildable = [r for r in rows if r.status != "not buildable"]
    supported = [r for r in buildable if r.status == "supported"]
    lines = [
        f"transformers {transformers.__version__}: **{len(supported)} of {len(buildable)}** buildable "
        f"image-text-to-text architectures supported ({len(rows)} in its auto mapping; "
        f"`python benchmarks/support_table.py`, record `benchmarks/results/arch_sweep_{MAJOR}.json`).",
        "",
        "| model type | class | status | decoder weights quantized | reload | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{100 * r.quantized / r.total:.1f} %" if r.total else ""
        reload = r.reload if r.status == "supported" else ""
        note = r.reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.model_type} | {r.model_class} | {r.status} | {share} | {reload} | {note} |")
    return "\n".join(lines)


def readme_statuses(text: str, major: str = MAJOR) -> dict[str, str]:
    """``{model type: status}`` from the README block of transformers ``major``."""
    begin, end = f"<!-- arch-sweep: transformers {major} -->", f"<!-- /arch-sweep: transformers {major} -->"
    if begin not in text:
        return {}
    block = text.split(begin, 1)[1].split(end, 1)[0]
    rows = [line.split("|")[1:-1] for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): cells[2].strip() for cells in rows[1:]}


def main() -> None:
    measured = Measurement("python benchmarks/support_table.py")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        rows = arch_sweep.sweep(work, progress=lambda r: print(f"{r.status:14s} {r.model_type} {r.reason}", flush=True))
    record = {
        **measured.record(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rows": [asdict(r) for r in rows],
    }
    out = HERE / "results" / f"arch_sweep_{MAJOR}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{table(rows)}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
    print(f"wrote {out} and the README block ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
