"""Sample batches: calibration samples of one sequence length run through a decoder layer together.

The block-wise gradient pass calls every decoder layer once per sample, forward and backward. On short
sequences (a small image, a short answer) that is dominated by the cost of each call, not by arithmetic, so
samples of equal length are stacked into one batch: their hidden states along the batch axis, and their
layer call kwargs too (:func:`stack_kwargs`: every tensor is concatenated along its batch axis, the first
axis of size 1, so the call looks like the model's own batched call; a tensor without such an axis must be
equal in every sample and is shared, as must be every other value; anything else keeps the samples apart).
Nothing here knows an architecture.

The plan is made once over the global sample list, before sharding, and ranks take whole batches
(:func:`assign_batches`), so the batch a sample runs in, and so every floating-point result for it, is the
same whatever the number of processes. A batch holds at most :data:`MAX_BATCH` samples and about
:data:`BATCH_ELEMENTS` hidden-state elements, so the autograd graph of one layer stays about as large as
for one long sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MAX_BATCH", "BATCH_ELEMENTS", "Unit", "plan_batches", "assign_batches", "stack_kwargs", "layer_units"]

#: Samples in one batch at most (also what keeps ranks' shares of the samples balanced).
MAX_BATCH = 16
#: Hidden-state elements (tokens x hidden size) in one batch at most; a longer sample runs alone.
BATCH_ELEMENTS = 1 << 20


def plan_batches(lengths: Sequence[int], hidden_size: int, max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Batches of sample indices: equal lengths, in order of first appearance, each at most ``max_batch``
    samples and :data:`BATCH_ELEMENTS` elements (at least one sample)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    batches = []
    for length, members in groups.items():
        size = max(1, min(max_batch, BATCH_ELEMENTS // max(1, hidden_size * length)))
        batches += [members[k : k + size] for k in range(0, len(members), size)]
    return batches


def assign_batches(batches: list[list[int]], world: int, rank: int) -> tuple[list[int], list[list[int]]]:
    """Rank ``rank``'s samples (global indices) and its batches as positions in that list.

    Each batch goes whole to the rank with the fewest samples so far (the lowest rank on ties), in plan
    order. Fewer batches than ranks: the largest batches are halved until every rank gets one (only then do
    results depend on the number of processes). Raises ``ValueError`` if there are fewer samples than ranks.
    """
    total = sum(len(b) for b in batches)
    if total < world:
        raise ValueError(f"{total} calibration samples cannot be shared by {world} processes: use more rows.")
    batches = [list(b) for b in batches]
    while len(batches) < world:
        k = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
        half = (len(batches[k]) + 1) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    load = [0] * world
    mine: list[list[int]] = []
    for batch in batches:
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += len(batch)
        if owner == rank:
            mine.append(batch)
    shard = [i for batch in mine for i in batch]
    positions, start = [], 0
    for batch in mine:
        positions.append(list(range(start, start + len(batch))))
        start += len(batch)
    return shard, positions


class _Unstackable(Exception):
    """Two samples' call arguments cannot be run as one batch."""


def _batch_axis(t: torch.Tensor) -> int:
    for axis, size in enumerate(t.shape):
        if size == 1:
            return axis
    raise _Unstackable


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype for v in values):
            raise _Unstackable
        try:
            return torch.cat(values, _batch_axis(first))
        except _Unstackable:  # no batch axis (e.g. cache positions): one value shared by the whole batch
            if all(torch.equal(v, first) for v in values[1:]):
                return first
            raise
    if isinstance(first, (tuple, list)):
        if not all(type(v) is type(first) and len(v) == len(first) for v in values):
            raise _Unstackable
        return type(first)(_stack([v[k] for v in values]) for k in range(len(first)))
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise _Unstackable
        return {k: _stack([v[k] for v in values]) for k in first}
    try:
        if all(v is first or (type(v) is type(first) and bool(v == first)) for v in values[1:]):
            return first
    except (TypeError, ValueError, RuntimeError):
        pass
    raise _Unstackable


def stack_kwargs(calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One call's kwargs for a batch of samples' ``calls``, or ``None`` if they do not stack."""
    try:
        return _stack(calls)
    except _Unstackable:
        return None


@dataclass
class Unit:
    """Samples that run through one decoder layer in one call: positions in the captured list, and the call's
    kwargs (stacked along the batch axis)."""

    samples: list[int]
    kwargs: dict[str, Any]


def layer_units(calls: list[dict[str, Any]], lengths: Sequence[int], batches: list[list[int]] | None) -> list[Unit]:
    """The units of one decoder layer: each batch (``None``: every sample alone) split by actual sequence length
    (``lengths``), run as one call where the samples' layer ``calls`` stack, else one call per sample."""
    units: list[Unit] = []
    for batch in batches if batches is not None else [[j] for j in range(len(calls))]:
        by_length: dict[int, list[int]] = {}
        for j in batch:
            by_length.setdefault(int(lengths[j]), []).append(j)
        for members in by_length.values():
            stacked = stack_kwargs([calls[j] for j in members]) if len(members) > 1 else calls[members[0]]
            if stacked is None:
                units += [Unit([j], calls[j]) for j in members]
            else:
                units.append(Unit(members, stacked))
    return units
