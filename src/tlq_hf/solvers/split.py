"""Row blocks of one solve shared out among processes (:class:`RowSplit`), for the solves too large for one rank.

A blocked factorisation or a GPTQ sweep is a sequence of block operations; under a :class:`RowSplit` each process
computes the row blocks it owns and receives the others' from their owners, so every block is computed by exactly
one process with exactly the operation one process alone would run: the result is the same bit for bit whatever the
number of processes. The split is installed for the duration of one solve with :func:`sharing` (the scheduler does
this for the largest groups of a layer) and read by the algorithms with :func:`current_split`; outside it every
block is this process's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

__all__ = ["RowSplit", "current_split", "sharing"]


@dataclass(frozen=True)
class RowSplit:
    """This process's share of a solve: block ``k`` is computed by rank ``k % world``; ``broadcast(tensor, src)``
    gives every rank ``src``'s ``tensor`` in place (a process group's broadcast)."""

    rank: int = 0
    world: int = 1
    broadcast: Callable[[torch.Tensor, int], object] | None = None

    def owner(self, block: int) -> int:
        return block % self.world

    def mine(self, block: int) -> bool:
        return self.owner(block) == self.rank

    def share(self, views: list[tuple[torch.Tensor, int]]) -> None:
        """Make each ``view`` (part of a tensor every rank holds) of a pair ``(view, block)`` the value block
        ``block``'s owner computed: one broadcast per owning rank, the views packed into one buffer."""
        if self.world == 1:
            return
        if self.broadcast is None:
            raise ValueError("RowSplit over several ranks needs a broadcast")
        for src in range(self.world):
            parts = [v for v, block in views if self.owner(block) == src]
            if not parts:
                continue
            if src == self.rank:
                buf = torch.cat([v.reshape(-1) for v in parts])
            else:
                buf = torch.empty(sum(v.numel() for v in parts), dtype=parts[0].dtype, device=parts[0].device)
            self.broadcast(buf, src)
            if src != self.rank:
                offset = 0
                for v in parts:
                    v.copy_(buf[offset : offset + v.numel()].view(v.shape))
                    offset += v.numel()


_ALONE = RowSplit()
_CURRENT: ContextVar[RowSplit] = ContextVar("tlq_row_split", default=_ALONE)


def current_split() -> RowSplit:
    """The split of the solve now running (one process owning every block outside :func:`sharing`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def sharing(split: RowSplit) -> Iterator[RowSplit]:
    """Within this context the blocked solves share their row blocks out by ``split``."""
    token = _CURRENT.set(split)
    try:
        yield split
    finally:
        _CURRENT.reset(token)
