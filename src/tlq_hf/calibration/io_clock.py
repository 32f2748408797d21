"""Time spent moving calibration data to and from storage, for the compute / I/O split of a run.

Spilled activations read and written (:class:`~.activations.ActivationStore`) and layers materialised
from their device-map copy (:func:`~.offload.onloaded`) add to one process-wide clock; the pipeline
reports the difference over a run (``QuantizationReport.io_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["io_seconds", "timed_io"]

_total = 0.0


def io_seconds() -> float:
    """Seconds spent in :func:`timed_io` blocks by this process so far."""
    return _total


@contextmanager
def timed_io() -> Iterator[None]:
    """Count the block's wall time as I/O (blocks must not nest)."""
    global _total
    start = time.perf_counter()
    try:
        yield
    finally:
        _total += time.perf_counter() - start
