"""hostmem: pages of a memory-mapped checkpoint tensor go back to the OS and read back unchanged; the libc
helpers degrade to ``None`` where a symbol is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tlq_hf.hostmem import MappedPages, libc_function, release_host_memory


def _resident_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux")
def test_mapped_pages_released_and_values_kept(tmp_path):
    big = torch.arange(8 << 20, dtype=torch.int32).reshape(2048, -1)  # 32 MiB
    save_file({"a": big, "b": torch.ones(10)}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")  # memory-mapped
    t = loaded["a"]
    assert int(t.sum(dtype=torch.int64)) == int(big.sum(dtype=torch.int64))  # every page read: resident
    before = _resident_kb()
    released = MappedPages().drop(t)
    assert released >= (32 << 20) - 2 * 4096
    assert _resident_kb() < before - 24 * 1024  # the RSS really fell
    assert torch.equal(t, big) and torch.equal(loaded["b"], torch.ones(10))  # read back from the file


def test_anonymous_tensors_untouched():
    t = torch.randn(1 << 20)
    copy = t.clone()
    assert MappedPages().drop(t) == 0 and torch.equal(t, copy)  # heap memory is never madvise-d


def test_libc_helpers():
    assert libc_function("no_such_symbol_tlq") is None
    release_host_memory()  # no error on any platform
