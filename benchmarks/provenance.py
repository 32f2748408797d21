"""Where a benchmark record came from: commit, versions, CPU, cores, threads, timestamps, load and the command.

:func:`provenance` gives the fields every record carries; :class:`Measurement` wraps one measurement and adds
when it ended, the load average at its start and end, and how much CPU *other* processes used meanwhile (the
machine's busy time from ``/proc/stat`` minus this process's and its waited-for children's), so a record says
itself whether it shared the cores (``contended``).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def now() -> str:
    """UTC now, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: what a record's code is: the package, the benchmark scripts, the tests and the project file (results and prose
#: that a benchmark itself rewrites — results/, README.md — do not make a run "dirty")
CODE = ("src", "benchmarks/*.py", "tests", "pyproject.toml")


def commit() -> str:
    """``HEAD``'s hash, with ``+dirty`` when the tracked code (:data:`CODE`) differs from it ("" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        diff = ["git", "diff", "--quiet", "HEAD", "--", *CODE]
        dirty = subprocess.run(diff, cwd=ROOT, capture_output=True).returncode != 0
    except OSError:
        return ""
    return f"{head}+dirty" if head and dirty else head


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


#: packages whose versions a record names (those installed; llm-compressor only in the peers' environment)
PACKAGES = ("torch", "transformers", "accelerate", "compressed-tensors", "safetensors", "llmcompressor")


def versions() -> dict[str, str]:
    """Python's and every installed package of :data:`PACKAGES`'s version (read from metadata, not imported)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


#: CPU features that decide which dtype computes fastest (bf16 matmuls are slow without avx512_bf16 / amx)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


def provenance(command: str, started: str | None = None) -> dict:
    """The record fields every results file carries (``started``: when the measurement began; default now)."""
    import torch

    return {
        "command": command,
        "commit": commit(),
        "started": started or now(),
        "versions": versions(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; 0.0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


class Measurement:
    """One measurement's provenance: create it when the measurement starts, call :meth:`record` when it ends.

    ``contended`` is true when other processes used more than ``CONTENDED`` of the machine's CPU time meanwhile:
    such a record's times are not comparable with an idle run's.
    """

    CONTENDED = 0.05

    def __init__(self, command: str) -> None:
        self.command = command
        self.started = now()
        self.load_start = os.getloadavg()
        self._wall = datetime.now(timezone.utc)
        self._busy, self._own = _busy_seconds(), _own_seconds()

    def record(self) -> dict:
        wall = (datetime.now(timezone.utc) - self._wall).total_seconds()
        other = max(0.0, (_busy_seconds() - self._busy) - (_own_seconds() - self._own))
        share = other / max(wall * (os.cpu_count() or 1), 1e-9)
        return {
            **provenance(self.command, self.started),
            "finished": now(),
            "load_start": [round(v, 2) for v in self.load_start],
            "load_end": [round(v, 2) for v in os.getloadavg()],
            "other_cpu_s": round(other, 1),
            "contended": share > self.CONTENDED,
        }
