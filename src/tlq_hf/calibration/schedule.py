"""Who solves what: each group of linears (or smoothing fold) is solved once, by its owner rank, and broadcast.

One ownership policy for every solve of a layer: largest estimated cost first, each to the least-loaded rank, the
same assignment on every rank (it depends on shapes only). With one process every owner is rank 0. With several,
a group that alone costs more than an equal share of the layer (a dense layer's down projection) is solved by every
rank together where its solver shares rows (:class:`~tlq_hf.solvers.split.RowSplit`: its factorisation's and its
sweep's row blocks shared out), then every rank solves the groups it owns, then the owned solutions are broadcast
group by group: no rank waits for another's group before starting its own, and each group is computed exactly as
one process computes it (the checkpoint does not depend on the number of processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..grids import grid_of
from ..nn import TLQLinear
from ..primitives import QParams
from ..qtypes import QuantScheme
from ..solvers import Solution
from ..solvers.split import RowSplit, sharing
from .distributed import Comm
from .stats import StatGroup

__all__ = ["SolveScheduler", "EVERY_RANK"]

#: the owner of a group every rank solves together
EVERY_RANK = -1
#: int8 code bytes a rank may hold solved before they are broadcast (see :meth:`SolveScheduler.windows`)
AHEAD_BYTES = 256 << 20

#: (weights as stored, the group) -> one solution per weight
Solve = Callable[[list[torch.Tensor], StatGroup], list[Solution]]


class SolveScheduler:
    """Owner ranks by cost, and the solve-on-owner-then-broadcast of groups of linears."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    @staticmethod
    def cost(linears: list[nn.Module]) -> float:
        """Cost model of a GPTQ-style solve of linears sharing an input: factorising ``in x in`` plus sweeping
        every member's columns."""
        return float(linears[0].weight.shape[1]) ** 3 / 3 + sum(float(m.weight.numel()) * 128 for m in linears)

    def owners(self, costs: list[float], shared: list[bool] | None = None) -> list[int]:
        """Owner rank of each job: :data:`EVERY_RANK` for the jobs that may be shared (``shared``) and cost more
        than an equal share of the total, then the rest largest cost first to the least-loaded rank (the same on
        every rank)."""
        world = self.comm.world
        total = sum(costs)
        owners = [0] * len(costs)
        if world > 1 and shared is not None:
            for k, c in enumerate(costs):
                if shared[k] and c > total / world:
                    owners[k] = EVERY_RANK
        load = [0.0] * world
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            if owners[k] == EVERY_RANK:
                continue
            owners[k] = min(range(world), key=lambda r: (load[r], r))
            load[owners[k]] += costs[k]
        return owners

    def solve(
        self,
        groups: list[StatGroup],
        live: dict[str, nn.Module],
        solve_of: Callable[[StatGroup], Solve],
        scheme: QuantScheme,
        scale_dtype: torch.dtype,
        shares_rows: Callable[[StatGroup], bool] = lambda g: False,
    ) -> Iterator[tuple[StatGroup, dict[str, TLQLinear], float]]:
        """For each group in order: its packed modules (by name), solved by the owner rank (``solve_of(group)``)
        and broadcast, or by every rank together (``shares_rows(group)``, see the module docstring), the same on
        every rank, and the seconds this rank spent solving it (0 where another rank owns it). With several ranks
        every rank solves the shared groups, then its own, of a window (:meth:`windows`) before the window's first
        broadcast (alone, each group is solved just before it is yielded: one group's solution in memory at a time);
        a group's statistics are freed once solved (on a rank that does not own it: at once)."""
        costs = [self.cost([live[n] for n in g.members]) for g in groups]
        owners = self.owners(costs, [shares_rows(g) for g in groups])
        split = RowSplit(self.comm.rank, self.comm.world, self.comm.broadcast_)

        def own(k: int) -> tuple[list[Solution] | None, float]:
            group, start = groups[k], time.perf_counter()
            solutions = None
            if owners[k] in (self.comm.rank, EVERY_RANK):
                with sharing(split if owners[k] == EVERY_RANK else RowSplit()):
                    solutions = solve_of(group)([live[n].weight.detach() for n in group.members], group)
            group.stats.clear()
            return solutions, (time.perf_counter() - start if solutions is not None else 0.0)

        for window in self.windows([[live[n] for n in g.members] for g in groups]):
            # shared solves first (every rank enters them together), then this rank's own, then the broadcasts
            done = {k: own(k) for k in sorted(window, key=lambda k: (owners[k] != EVERY_RANK, k))}
            for k in window:
                group, owner = groups[k], owners[k]
                solutions, seconds = done.pop(k)
                linears = [live[n] for n in group.members]
                solutions = solutions or [self._empty_solution(m, scheme, scale_dtype) for m in linears]
                packed = {}
                for name, linear, (codes, qp) in zip(group.members, linears, solutions):
                    if owner != EVERY_RANK:
                        for t in (codes, qp.scale, qp.zero, qp.global_scale):
                            if t is not None:  # gloo has no float8: its bytes travel as uint8
                                fp8 = t.dtype == torch.float8_e4m3fn
                                self.comm.broadcast_(t.view(torch.uint8) if fp8 else t, owner)
                    packed[name] = TLQLinear.from_codes(codes, qp, scheme, bias=linear.bias, dtype=scale_dtype)
                del solutions
                yield group, packed, seconds

    def windows(self, linears: list[list[nn.Module]]) -> list[list[int]]:
        """Consecutive groups solved before their solutions are broadcast: alone one group at a time; with several
        ranks as many as hold at most :data:`AHEAD_BYTES` of codes (at least one; the same on every rank, from
        shapes only), so a rank keeps a bounded number of finished solutions (a dense layer: one window; an MoE
        layer's experts: a few)."""
        if self.comm.world == 1:
            return [[k] for k in range(len(linears))]
        out: list[list[int]] = []
        held = 0
        for k, members in enumerate(linears):
            size = sum(m.weight.numel() for m in members)
            if not out or held + size > AHEAD_BYTES:
                out.append([])
                held = 0
            out[-1].append(k)
            held += size
        return out

    @staticmethod
    def _empty_solution(linear: nn.Module, scheme: QuantScheme, dtype: torch.dtype) -> Solution:
        """Buffers a non-owner rank receives the owner's solution into."""
        out_f, in_f = linear.weight.shape
        n_groups = scheme.groups(in_f)
        device = linear.weight.device
        grid = grid_of(scheme)
        return (
            torch.empty(out_f, in_f, dtype=grid.code_dtype, device=device),
            QParams(
                scale=torch.empty(out_f, n_groups, dtype=grid.stored_scale_dtype(dtype), device=device),
                zero=torch.zeros(out_f, n_groups, dtype=torch.int8, device=device),
                global_scale=torch.empty(1, dtype=torch.float32, device=device) if grid.has_global_scale else None,
            ),
        )
