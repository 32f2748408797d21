"""Host memory and the C library: the one place tlq_hf talks to libc.

- :func:`release_host_memory` / :func:`map_large_allocations`: keep glibc's heap from holding freed memory
  (calibration onloads and drops a layer at a time, so a held heap would make peak RSS grow with depth).
- :class:`MappedPages`: give the pages of a dropped, memory-mapped checkpoint tensor back to the OS.
  A checkpoint loaded from safetensors is memory-mapped: the pages of a tensor count in the process's
  resident set once read, and stay there after the tensor is replaced (say, by a kernel's repacked copy) for
  as long as anything else keeps the file mapped. Only pages of a file mapping that lie wholly inside the
  bytes of a tensor the caller is discarding are dropped (``madvise(MADV_DONTNEED)``), so no value anyone
  still reads can change (a dropped page is read again from the file).
- :func:`libc_function`: a libc symbol, or ``None`` on platforms without glibc (every caller degrades to a
  documented fallback).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import sys
from collections.abc import Callable

import torch

__all__ = ["MappedPages", "libc_function", "map_large_allocations", "release_host_memory"]

logger = logging.getLogger(__name__)
_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def libc_function(name: str, argtypes: list | None = None) -> Callable | None:
    """The C library's ``name`` (with ``argtypes`` set when given), or ``None`` where there is none."""
    fn = getattr(_libc(), name, None)
    if fn is not None and argtypes is not None:
        fn.argtypes = argtypes
    return fn


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed blocks otherwise, so peak RSS would
    grow with every layer onloaded and dropped)."""
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def map_large_allocations(threshold: int = 16 << 20) -> None:
    """From now on, glibc serves every allocation of ``threshold`` bytes or more from its own mapping, which
    goes back to the OS when freed.

    By default glibc raises this threshold (up to 32 MB) each time a mapped block is freed, after which
    calibration's many tensors of tens of MB (Hessian blocks, layer weights, spilled activations) come from the
    heap and fragment it: on a LLaVA-1B layer loop about 330 MB of the peak anonymous memory was freed-but-held
    heap. A lower threshold costs time instead: every mapped allocation is page-faulted and zeroed afresh, and at
    1 MiB (each per-sample activation of a 1B layer) calibration of the 2-layer 1B slice took 1.15x (plain GPTQ)
    to 1.12x (TLQ) its time at 16 MiB. The price is held heap: 0.13 GB more peak RSS for that slice in memory,
    and TLQ on the disk-offloaded full 1B model peaked at 2.24 GB instead of 1.82 GB (still flat in depth).
    Process-wide and lasting (glibc cannot restore its adaptive threshold); skipped when the user set
    ``MALLOC_MMAP_THRESHOLD_`` and on other C libraries.
    """
    mallopt = libc_function("mallopt")
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, int(threshold))


def _file_maps() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


class MappedPages:
    """The process's file mappings, read once; :meth:`drop` releases the resident pages of a (contiguous,
    about to be discarded) tensor that lies in one and returns the bytes released."""

    def __init__(self) -> None:
        self._madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
        try:
            self._maps = _file_maps() if self._madvise is not None else []
        except OSError:
            self._maps = []

    def drop(self, t: torch.Tensor) -> int:
        if not self._maps or t.device.type != "cpu" or not t.is_contiguous():
            return 0
        start = t.data_ptr()  # the tensor's own bytes: its storage may be the whole memory-mapped file
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self._maps):
            return 0
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (end // page) * page  # whole pages only: neighbours stay mapped
        return hi - lo if hi > lo and self._madvise(lo, hi - lo, _MADV_DONTNEED) == 0 else 0
