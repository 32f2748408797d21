"""Canonical safetensors headers: the same tensors and metadata give the same bytes.

The safetensors writer keeps the ``__metadata__`` entries in a hash map, so their order in the file header
(and so the file's bytes) changes from one save to the next when there is more than one entry (transformers
adds ``format``, tlq_hf its provenance). :func:`canonicalize_safetensors` rewrites the header in place with the
metadata keys sorted, same length (padded with spaces, as the format allows), tensor data untouched.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

__all__ = ["canonicalize_safetensors"]


def canonicalize_safetensors(folder: str | os.PathLike) -> int:
    """Sort the metadata of every ``*.safetensors`` header in ``folder``; returns how many files changed."""
    changed = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "r+b") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            raw = f.read(size)
            header = json.loads(raw)
            meta = header.get("__metadata__")
            if not meta:
                continue
            header["__metadata__"] = dict(sorted(meta.items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) > size:  # cannot happen for a reordering of the writer's compact JSON; never truncate
                raise ValueError(f"{path}: canonical header longer than the original ({len(text)} > {size}).")
            text += b" " * (size - len(text))
            if text != raw:
                f.seek(8)
                f.write(text)
                changed += 1
    return changed
