"""Who solves what: each group of linears (or smoothing fold) is solved once, by its owner rank, and broadcast.

One ownership policy for every solve of a layer: largest estimated cost first, each to the least-loaded rank, the
same assignment on every rank (it depends on shapes only). With one process every owner is rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..nn import TLQLinear
from ..primitives import QParams
from ..qtypes import QuantScheme
from ..solvers import Solution
from .distributed import Comm
from .stats import StatGroup

__all__ = ["SolveScheduler"]

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

    def owners(self, costs: list[float]) -> list[int]:
        """Owner rank of each job: largest cost first to the least-loaded rank (the same on every rank)."""
        load = [0.0] * self.comm.world
        owners = [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            owners[k] = min(range(self.comm.world), key=lambda r: (load[r], r))
            load[owners[k]] += costs[k]
        return owners

    def solve(
        self,
        groups: list[StatGroup],
        live: dict[str, nn.Module],
        solve_of: Callable[[StatGroup], Solve],
        scheme: QuantScheme,
        scale_dtype: torch.dtype,
    ) -> Iterator[tuple[StatGroup, dict[str, TLQLinear]]]:
        """For each group in order: its packed modules (by name), solved by the owner rank (``solve_of(group)``)
        and broadcast, the same on every rank. A group's statistics are freed once solved."""
        owners = self.owners([self.cost([live[n] for n in g.members]) for g in groups])
        for group, owner in zip(groups, owners):
            linears = [live[n] for n in group.members]
            if self.comm.rank == owner:
                solutions = solve_of(group)([m.weight.detach() for m in linears], group)
            else:
                solutions = [self._empty_solution(m, scheme, scale_dtype) for m in linears]
            group.stats.clear()
            packed = {}
            for name, linear, (codes, qp) in zip(group.members, linears, solutions):
                for t in (codes, qp.scale, qp.zero):
                    self.comm.broadcast_(t, owner)
                packed[name] = TLQLinear.from_codes(codes, qp, scheme, bias=linear.bias)
            del solutions
            yield group, packed

    @staticmethod
    def _empty_solution(linear: nn.Module, scheme: QuantScheme, dtype: torch.dtype) -> Solution:
        """Buffers a non-owner rank receives the owner's solution into."""
        out_f, in_f = linear.weight.shape
        n_groups = scheme.groups(in_f)
        device = linear.weight.device
        return (
            torch.empty(out_f, in_f, dtype=torch.int8, device=device),
            QParams(
                scale=torch.empty(out_f, n_groups, dtype=dtype, device=device),
                zero=torch.zeros(out_f, n_groups, dtype=torch.int8, device=device),
            ),
        )
