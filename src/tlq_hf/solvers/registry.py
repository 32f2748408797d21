"""The solvers and smoothers the layer loop looks up by name (``TLQConfig(solver=...)``, a method's recipe).

Each registers beside its algorithm (``solvers/gptq.py`` registers ``"gptq"``, ...) with :func:`layer_solver` or
:func:`smoother`: the statistics it needs (kinds of :data:`tlq_hf.calibration.stats.STATISTICS`) and an adapter
from one group of linears that share an input, with their statistics, to codes and qparams. The adapters read the
statistics through the small protocol below; they never pack and never touch modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..primitives import QParams
from ..qtypes import QuantScheme
from ..registry import Registry

__all__ = ["LAYER_SOLVERS", "SMOOTHERS", "LayerSolver", "Smoother", "Solution", "layer_solver", "smoother"]

Solution = tuple[torch.Tensor, QParams]


class Statistics(Protocol):
    """What an adapter is given: the statistics of one group of linears that read the same input."""

    stats: dict[str, Any]  # kind -> statistic (see tlq_hf.calibration.stats)


#: (weights as stored, e.g. bf16: a solver makes the float32 copies it needs; group; scheme; the layer settings;
#: the dtype scales are stored in) -> one solution per weight
SolveFn = Callable[[list[torch.Tensor], Statistics, QuantScheme, Any, torch.dtype], list[Solution]]
#: (weights as stored, group, scheme, settings) -> the per-input-channel scale ``s`` of a fold
ScalesFn = Callable[[list[torch.Tensor], Statistics, QuantScheme, Any], torch.Tensor]


@dataclass(frozen=True)
class LayerSolver:
    """A solver as the layer loop uses it: its name, the statistics it needs and how it solves one group;
    ``shares_rows``: its solve may run on every rank at once under a :class:`~tlq_hf.solvers.split.RowSplit`
    (it computes the same solution on every rank, sharing its row blocks out)."""

    name: str
    needs: tuple[str, ...]
    solve: SolveFn
    shares_rows: bool = False


@dataclass(frozen=True)
class Smoother:
    """A per-channel migration: its name, the statistics it needs and its scale ``s`` for one
    (producer, consumers) fold."""

    name: str
    needs: tuple[str, ...]
    scales: ScalesFn


LAYER_SOLVERS: Registry[LayerSolver] = Registry("solver")
SMOOTHERS: Registry[Smoother] = Registry("smoother")


def layer_solver(name: str, needs: tuple[str, ...] = (), shares_rows: bool = False) -> Callable[[SolveFn], SolveFn]:
    """Decorator: register the adapter as the solver ``name`` needing the statistics ``needs`` (``shares_rows``: see
    :class:`LayerSolver`)."""

    def register(fn: SolveFn) -> SolveFn:
        LAYER_SOLVERS.register(LayerSolver(name, tuple(needs), fn, shares_rows))
        return fn

    return register


def smoother(name: str, needs: tuple[str, ...] = ()) -> Callable[[ScalesFn], ScalesFn]:
    """Decorator: register the scale function as the smoother ``name`` needing the statistics ``needs``."""

    def register(fn: ScalesFn) -> ScalesFn:
        SMOOTHERS.register(Smoother(name, tuple(needs), fn))
        return fn

    return register
