"""Benchmark records: the figures generated from them are the ones committed, and a record says whether other
work shared the cores while it was measured."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import inference  # noqa: E402
import provenance  # noqa: E402
import quality_summary  # noqa: E402
import scale  # noqa: E402

RESULTS = BENCHMARKS / "results"
README = BENCHMARKS.parent / "README.md"


def test_scale_markdown_and_the_readme_blocks_are_the_ones_generated_from_scale_json():
    runs = json.loads((RESULTS / "scale.json").read_text())["runs"]
    fix = "in benchmarks/: python -c 'import scale; scale.write([])'"
    assert (RESULTS / "SCALE.md").read_text() == scale.scale_markdown(runs), fix
    text = README.read_text()
    blocks = scale.readme_blocks(runs)
    assert blocks["moe"] and blocks["peers-l2"]
    for key, block in blocks.items():
        begin, end = scale.BLOCKS[key]
        if block or begin in text:  # a block with records is in the README, as generated
            assert text.split(begin, 1)[1].split(end, 1)[0].strip() == block.strip(), (key, fix)


def test_the_readme_inference_table_is_the_one_generated_from_its_record():
    result = json.loads((RESULTS / "inference.json").read_text())
    block = README.read_text().split(inference.README_BEGIN, 1)[1].split(inference.README_END, 1)[0]
    assert block.strip() == inference.readme_block(result).strip()
    assert len(result["variants"]["native"]["runs_decode_tok_s"]) >= 3 and not result["contended"]


def test_the_readme_quality_summary_is_the_one_generated_from_quality_json():
    quality = json.loads((RESULTS / "quality.json").read_text())
    text = README.read_text()
    block = text.split(quality_summary.BEGIN, 1)[1].split(quality_summary.END, 1)[0]
    assert block.strip() == quality_summary.summary(quality).strip(), "run: python benchmarks/quality_summary.py"
    assert "| W3A16-g128 | 8 |" in block  # every benchmark VLM in the headline scheme


def test_records_of_this_format_carry_their_provenance():
    runs = json.loads((RESULTS / "scale.json").read_text())["runs"]  # every record: the unprovenanced were dropped
    assert len(runs) >= 20 and any(r["name"] == "qwen2vl-7b-disk" for r in runs)
    for r in runs:
        assert {"command", "commit", "started", "finished", "versions", "cpu", "cpus", "threads"} <= set(r), r["name"]
        assert not r["commit"].endswith("+dirty") and len(r["commit"]) == 40


def _spin(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"]


def test_a_measurement_counts_other_processes_cpu_and_not_its_own_childrens():
    measured = provenance.Measurement("own child")
    subprocess.run(_spin(1.5), check=True)  # this process's child: its CPU time is the measurement's own
    own = measured.record()
    assert own["other_cpu_s"] < 0.75 and {"load_start", "load_end", "finished"} <= set(own)

    other = subprocess.Popen(_spin(3.0))  # not waited for before the record: someone else's work
    try:
        measured = provenance.Measurement("beside a busy process")
        time.sleep(2.0)
        shared = measured.record()
    finally:
        other.wait()
    assert shared["other_cpu_s"] > 1.0 and shared["contended"]


def test_the_committed_per_item_metrics_recompute_every_quality_interval():
    """quality_items.pt is committed beside quality.json: every ratio and interval of the table comes back from it."""
    import quality

    items = quality.ItemMetrics.load(RESULTS / quality.ITEMS_NAME)
    ratios = json.loads((RESULTS / "quality.json").read_text())["ratios"]
    table = {r["scheme"] for r in ratios}
    recomputed = {
        (r["model"], r["scheme"], r["numerator"], r["denominator"]): r
        for r in items.ratios(sorted({r["model"] for r in ratios}), sorted(table))
    }
    checked = 0
    for r in ratios:
        key = (r["model"], r["scheme"], r["numerator"], r["denominator"])
        if key in recomputed:  # schemes whose per-item data predates committing it are listed in quality_summary
            assert recomputed[key] == r, key
            checked += 1
    assert checked >= 4 * 8 * 2  # W3A16-g128, W4A16-g128, W8A8, W4A8 on the 8 models, TLQ / GPTQ and / llm-compressor
