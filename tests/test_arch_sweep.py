"""Every image-text-to-text architecture of the installed transformers whose config shrinks (``arch_sweep``):
quantized on load, saved, reloaded in a fresh interpreter to the in-memory model; unsupported ones refused by
tlq_hf before any weight changed; the README's support table says exactly what this run found."""

from __future__ import annotations

import sys
from pathlib import Path

import arch_sweep
import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from support_table import readme_statuses  # noqa: E402

MAJOR = transformers.__version__.split(".")[0]

#: Broken today, by transformers line: each a known gap named in the issue note, to be fixed or refused before any
#: weight changes. Nothing else may break. (Types whose checkpoints transformers cannot reload are refused:
#: ``tlq_hf.formats.reload_failures``, checked below.)
KNOWN_BROKEN: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return arch_sweep.sweep(tmp_path_factory.mktemp("sweep"))


def test_every_buildable_architecture_is_supported_or_refused_by_name(rows):
    assert len(rows) == len(arch_sweep.architectures()) > 40
    known = KNOWN_BROKEN.get(MAJOR, {})
    broken = {r.model_type: r.reason for r in rows if r.status == "broken" and r.model_type not in known}
    assert not broken, broken
    supported = [r for r in rows if r.status == "supported"]
    assert len(supported) >= 0.6 * sum(r.status != "not buildable" for r in rows)
    for r in supported:
        assert 0 < r.quantized <= r.total and r.max_logit_diff is not None and r.max_logit_diff <= arch_sweep.ATOL
    for r in rows:
        if r.status == "unsupported":  # a tlq_hf error naming what to do
            assert r.reason.split(":")[0].endswith("Error") and len(r.reason) > 40


def test_refused_for_reload_failures_and_every_refusal_is_still_needed(rows, tmp_path, monkeypatch):
    """Types in ``RELOAD_FAILURES`` are refused naming the reason; with the refusal lifted, each is still broken on
    this transformers (the table holds no stale entry)."""
    from tlq_hf.formats import reload_failures

    table = reload_failures.RELOAD_FAILURES.get(MAJOR, {}).get("compressed-tensors", {})
    by_type = {r.model_type: r for r in rows}
    for model_type in table:
        row = by_type[model_type]
        assert row.status == "unsupported" and "cannot reload" in row.reason, row
    monkeypatch.setattr(reload_failures, "RELOAD_FAILURES", {})
    lifted = arch_sweep.sweep(tmp_path, sorted(table))
    assert {r.model_type: r.status for r in lifted} == dict.fromkeys(table, "broken")


def test_readme_support_table_matches_this_run(rows):
    statuses = readme_statuses((ROOT / "README.md").read_text(), MAJOR)
    assert statuses, f"README has no support table for transformers {MAJOR}: run python benchmarks/support_table.py"
    assert statuses == {r.model_type: r.status for r in rows}, "README is stale: run python benchmarks/support_table.py"
