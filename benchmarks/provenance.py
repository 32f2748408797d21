"""Where a benchmark record came from: commit, versions, CPU, threads, timestamps and the command that made it."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def now() -> str:
    """UTC now, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def commit() -> str:
    """``HEAD``'s hash, with ``+dirty`` when tracked files differ from it ("" outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0
    except OSError:
        return ""
    return f"{head}+dirty" if head and dirty else head


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def provenance(command: str, started: str | None = None) -> dict:
    """The record fields every results file carries (``started``: when the measurement began; default now)."""
    import torch
    import transformers

    return {
        "command": command,
        "commit": commit(),
        "started": started or now(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
