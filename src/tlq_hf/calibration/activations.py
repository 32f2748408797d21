"""The activation store: per-sample tensors of one layer boundary, in host memory or spilled to disk.

Capture, the gradient pass and the layer loop each hold "one tensor per calibration sample" for the
boundary they work on (layer inputs, full-precision targets, gradients). An :class:`ActivationStore` is
that list. With ``spill_dir`` every item is written as one safetensors file and read back on access, so
host memory holds only the sample being computed; without it, items stay on the CPU. Items are stored in
the dtype they are given (the model dtype: calibration computes in float32 where it must, stores in the
model's own precision).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from .io_clock import timed_io

__all__ = ["ActivationStore", "spill_root"]

_ids = itertools.count()


def spill_root(offload_dir: str | os.PathLike | None) -> str | None:
    """A fresh private folder under ``offload_dir`` for this run's spilled activations (``None``: keep in memory)."""
    if offload_dir is None:
        return None
    os.makedirs(offload_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix="tlq-activations-", dir=offload_dir)


class ActivationStore:
    """A list of per-sample tensors, kept on the CPU or (with ``spill_dir``) one file each on disk."""

    def __init__(self, spill_dir: str | os.PathLike | None = None, name: str = "acts") -> None:
        self._items: list[torch.Tensor | str | None] = []
        self._dir = None
        if spill_dir is not None:
            self._dir = os.path.join(os.fspath(spill_dir), f"{name}-{next(_ids)}")
            os.makedirs(self._dir, exist_ok=True)

    @classmethod
    def of(cls, tensors: list[torch.Tensor], spill_dir: str | os.PathLike | None = None, name: str = "acts"):
        store = cls(spill_dir, name)
        for t in tensors:
            store.append(t)
        return store

    def append(self, tensor: torch.Tensor) -> None:
        self.put(len(self._items), tensor)

    def put(self, index: int, tensor: torch.Tensor) -> None:
        """Store ``tensor`` as item ``index``; items may be written in any order (reading a hole is an error)."""
        tensor = tensor.detach()
        if index >= len(self._items):
            self._items.extend([None] * (index + 1 - len(self._items)))
        if self._dir is None:
            self._items[index] = tensor.cpu()
            return
        path = os.path.join(self._dir, f"{index}.safetensors")
        with timed_io():
            save_file({"t": tensor.cpu().contiguous()}, path)
        self._items[index] = path

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if item is None:
            raise IndexError(f"activation store item {index} was never written")
        if isinstance(item, str):
            with timed_io():
                return load_file(item)["t"]
        return item

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def resident_bytes(self) -> int:
        """Bytes this store holds in host memory (0 when spilled)."""
        return sum(t.numel() * t.element_size() for t in self._items if isinstance(t, torch.Tensor))

    def close(self) -> None:
        """Drop every item (and its file)."""
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
