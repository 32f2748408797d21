"""Host memory: give the pages of a dropped, memory-mapped checkpoint tensor back to the OS.

A checkpoint loaded from safetensors is memory-mapped: the pages of a tensor count in the process's resident
set once read, and stay there after the tensor is replaced (say, by a kernel's repacked copy) for as long as
anything else keeps the file mapped. :func:`drop_mapped_pages` tells the kernel it may drop them
(``madvise(MADV_DONTNEED)``): only pages of a file mapping that lie wholly inside the bytes of a tensor the
caller is discarding, so no value anyone still reads can change (a dropped page is read again from the file).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

__all__ = ["drop_mapped_pages"]

logger = logging.getLogger(__name__)
_MADV_DONTNEED = 4


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


def drop_mapped_pages(tensors: list[torch.Tensor]) -> int:
    """Release the resident pages of every (contiguous, about to be discarded) tensor that lies in a file mapping;
    returns the bytes released."""
    if not sys.platform.startswith("linux") or not tensors:
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        maps = _file_maps()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            continue
        start = t.data_ptr()  # the tensor's own bytes: its storage may be the whole memory-mapped file
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in maps):
            continue
        lo, hi = -(-start // page) * page, (end // page) * page  # whole pages only: neighbours stay mapped
        if hi > lo and libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
            released += hi - lo
    return released
