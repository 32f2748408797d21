"""Per-solver calibration statistics, shared by the modules that see the same input.

A :class:`Statistic` accumulates what a solver needs from the (importance-weighted) tokens a module's input
carried: a weighted Hessian (GPTQ), a bounded subsample of input rows (AWQ scale / clip search), the
per-channel absolute maximum (SmoothQuant). Each has ``update`` (one sample's rows), ``rescale`` (the
inputs were divided per channel by ``s``: a smoothing fold), ``reduce`` (across processes) and
``state_dict`` / ``load_state_dict``. They are looked up by kind in :data:`STATISTICS`.

Modules that read the same input tensor (q/k/v, gate/up) are found generically by running one sample
through the layer and seeing which modules received the very same tensor object. They share one hook
(the input is prepared once); with the same token weights (every baseline) they also form one
:class:`StatGroup`: one statistic, one factorisation. With per-module token importance (TLQ: the gradient
at each module's own output) the objectives differ, so each module keeps its own statistic, except where the
weights coincide (an expert's gate and up projections, weighted at the experts module's output): those share
one (``TokenWeighting.partition``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from torch import nn

from ..act_formats import ActFormat
from ..experts import every_token_to_every_expert, routed_tokens
from ..hostmem import release_host_memory
from ..primitives import strided_rows
from ..registry import Registry
from .distributed import Comm

T = TypeVar("T")
__all__ = [
    "STATISTICS",
    "Statistic",
    "HessianStatistic",
    "InputRowsStatistic",
    "AbsMaxStatistic",
    "InputRangeStatistic",
    "CrossStatistic",
    "StatGroup",
    "StatCollector",
    "shared_input_groups",
]

#: statistic classes by ``kind``; a class registers itself with ``@STATISTICS.register``
STATISTICS: Registry[type[Statistic]] = Registry("statistic", key="kind")


class Statistic(ABC):
    """What one solver needs from the rows ``x [N, in]`` (float32) with token weights ``a [N]`` (>= 0)."""

    kind: ClassVar[str]
    #: whether :meth:`update` sees the input before the scheme's activation quantization (else after it, as the
    #: packed layer computes)
    raw: ClassVar[bool] = False
    #: whether :meth:`update` also takes ``reference``: the same tokens' input to the module when the
    #: full-precision layer runs on the full-precision layer input (see :class:`CrossStatistic`)
    paired: ClassVar[bool] = False

    @abstractmethod
    def update(self, x: torch.Tensor, a: torch.Tensor, sample: int, reference: torch.Tensor | None = None) -> None: ...

    @abstractmethod
    def rescale(self, s: torch.Tensor) -> None:
        """The inputs became ``x / s`` (per input channel)."""

    @abstractmethod
    def reduce(self, comm: Comm) -> None:
        """Combine every rank's statistic; afterwards all ranks hold the same value."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def footprint(self, in_features: int, samples: int) -> int:
        """Bytes this statistic will hold for an input of ``in_features`` channels over ``samples`` samples."""


_PRODUCTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _product_buffers(numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 and a float64 buffer per device, reused by every Hessian block update: the block's float32 product
    is written into the first, widened into the second and added to the float64 block. Fresh tensors per block and
    sample (the product, and the float64 copy a mixed-dtype ``add_`` makes: 8 and 16 MiB at a 1B down_proj) are
    large allocations that calibration serves from fresh memory mappings (:func:`tlq_hf.hostmem.map_large_allocations`),
    whose page faults and zeroing doubled the time of a 1B model's down_proj Hessian. At most
    :attr:`HessianStatistic.ROW_BLOCK` elements and a little more: 24 MiB."""
    buffers = _PRODUCTS.get(device)
    if buffers is None or buffers[0].numel() < numel:
        _PRODUCTS.pop(device, None)  # release before the larger ones are allocated
        buffers = _PRODUCTS[device] = (
            torch.empty(numel, dtype=torch.float32, device=device),
            torch.empty(numel, dtype=torch.float64, device=device),
        )
    return buffers


@STATISTICS.register
class HessianStatistic(Statistic):
    """``H = sum_t a_t x_t x_t^T`` and ``mass = sum_t a_t`` over tokens with ``a_t > 0``.

    Each sample's float32 product is added into a float64 sum, so a sample's contribution does not depend
    on which other samples share its process: sharded runs give the same Hessian as one process up to
    float64 rounding of the final sum (the float32 result is then identical in practice). ``H`` is symmetric,
    so only its lower triangle is kept, as row blocks ``H[r0:r1, :r1]`` of about :data:`ROW_BLOCK` elements
    each: half the products, and in float64 no more memory than the full float32 matrix. One block's product
    is computed and added at a time (no ``in x in`` temporary), and the float32 normalised Hessian is built
    block by block while the float64 blocks are released.
    """

    kind = "hessian"
    ROW_BLOCK: ClassVar[int] = 1 << 21
    #: float64 bytes released by :meth:`take_normalized` between two heap trims
    TRIM_BYTES: ClassVar[int] = 64 << 20

    def __init__(self, **_: object) -> None:
        self.blocks: list[torch.Tensor] | None = None  # block k: rows [r0, r1) x columns [0, r1)
        self.mass = 0.0

    @classmethod
    def _row_ranges(cls, n: int) -> list[tuple[int, int]]:
        """Row ranges ``[r0, r1)`` whose lower-triangle blocks ``(r1 - r0) x r1`` hold about ``ROW_BLOCK`` elements."""
        ranges, r0 = [], 0
        while r0 < n:
            rows = max(1, int((math.sqrt(r0 * r0 + 4 * cls.ROW_BLOCK) - r0) / 2))
            ranges.append((r0, min(n, r0 + rows)))
            r0 = ranges[-1][1]
        return ranges

    @staticmethod
    def _spans(blocks: list[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, block)`` of every lower-triangle block (its shape is ``(r1 - r0) x r1``)."""
        return [(b.shape[1] - b.shape[0], b.shape[1], b) for b in blocks]

    @property
    def sum(self) -> torch.Tensor | None:
        """The float64 sum as one symmetric matrix (a copy, for inspection and tests)."""
        if self.blocks is None:
            return None
        n = self.blocks[-1].shape[1]
        full = torch.zeros(n, n, dtype=torch.float64, device=self.blocks[0].device)
        for r0, r1, block in self._spans(self.blocks):
            full[r0:r1, :r1] = block
        return full.tril() + full.tril(-1).T

    def update(self, x: torch.Tensor, a: torch.Tensor, sample: int, reference: torch.Tensor | None = None) -> None:
        keep = a > 0
        if not bool(keep.all()):
            x, a = x[keep], a[keep]
        x, a = x.float(), a.float()
        n = x.shape[1]
        if self.blocks is None:
            ranges = self._row_ranges(n)
            self.blocks = [torch.zeros(r1 - r0, r1, dtype=torch.float64, device=x.device) for r0, r1 in ranges]
        xa = x * a[:, None]
        single, double = _product_buffers(max(b.numel() for b in self.blocks), x.device)
        for r0, r1, block in self._spans(self.blocks):
            product = single[: block.numel()].view(block.shape)
            torch.mm(xa[:, r0:r1].T, x[:, :r1], out=product)
            block.add_(double[: block.numel()].view(block.shape).copy_(product))  # exact widening, then the sum
        self.mass += float(a.double().sum())

    def footprint(self, in_features: int, samples: int) -> int:
        return in_features * (in_features + 1) // 2 * 8

    def rescale(self, s: torch.Tensor) -> None:
        if self.blocks is not None:
            inv = 1.0 / s.to(self.blocks[0].device, torch.float64)
            for r0, r1, block in self._spans(self.blocks):
                block.mul_(inv[r0:r1, None]).mul_(inv[None, :r1])

    def reduce(self, comm: Comm) -> None:
        if comm.world == 1:
            return
        if self.blocks is None:
            raise RuntimeError("a rank saw no tokens for a module: use at least as many samples as processes")
        for block in self.blocks:
            comm.all_reduce_(block)
        (self.mass,) = comm.sum(self.mass)

    def _accumulated(self) -> list[torch.Tensor]:
        if self.blocks is None:
            raise RuntimeError("no calibration tokens reached this module")
        return self.blocks

    def normalized(self) -> torch.Tensor:
        """``sum_t a_t x_t x_t^T / sum_t a_t`` (float32)."""
        self._accumulated()
        return (self.sum / max(self.mass, 1e-12)).float()

    def take_normalized(self) -> torch.Tensor:
        """:meth:`normalized`, releasing each float64 block as soon as it is converted (the solver owns the result).

        The blocks (just under 16 MiB each) come from the heap, where a freed block's pages stay resident: the
        heap is trimmed each time :data:`TRIM_BYTES` of blocks were released, so the float64 sum shrinks while the
        float32 matrix grows (a 1B down_proj: 0.27 GB of each; without the trims both at once, at the layer's
        peak). Smaller Hessians trim nothing: a trim also hands back the heap the next forward reuses, whose pages
        are then faulted in again (trimming after every block made TLQ's 1B layer loop 7 % slower)."""
        blocks, self.blocks = self._accumulated(), None
        ranges = [(r0, r1) for r0, r1, _ in self._spans(blocks)]
        n = ranges[-1][1]
        out = torch.empty(n, n, dtype=torch.float32, device=blocks[0].device)
        released = 0
        for r0, r1 in ranges:
            block = blocks.pop(0)
            out[r0:r1, :r1] = block.div_(max(self.mass, 1e-12))
            released += block.numel() * block.element_size()
            del block
            if released >= self.TRIM_BYTES:
                release_host_memory()
                released = 0
        for r0, r1 in ranges:  # the upper triangle mirrors the lower one (exactly symmetric)
            diagonal = out[r0:r1, r0:r1]
            diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
            out[r0:r1, r1:] = out[r1:, r0:r1].T
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "mass": torch.tensor(self.mass, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        total = state["sum"]
        if total is None:
            self.blocks = None
        else:
            self.blocks = [total[r0:r1, :r1].clone() for r0, r1 in self._row_ranges(total.shape[0])]
        self.mass = float(state["mass"])


@STATISTICS.register
class InputRowsStatistic(Statistic):
    """Up to ``rows_per_sample`` evenly strided input rows (with their weights) of every sample, on CPU."""

    kind = "inputs"

    def __init__(self, rows_per_sample: int = 4096, **_: object) -> None:
        self.rows_per_sample = rows_per_sample
        self.samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, x: torch.Tensor, a: torch.Tensor, sample: int, reference: torch.Tensor | None = None) -> None:
        keep = a > 0
        xs, ws = strided_rows(x[keep], a[keep], self.rows_per_sample)
        self.samples[sample] = (xs.cpu(), ws.cpu())

    def footprint(self, in_features: int, samples: int) -> int:
        return self.rows_per_sample * samples * (in_features + 1) * 4

    def rows(self, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All kept rows in sample order, subsampled to at most ``max_rows``."""
        order = sorted(self.samples)
        x = torch.cat([self.samples[i][0] for i in order])
        a = torch.cat([self.samples[i][1] for i in order])
        return strided_rows(x, a, max_rows)

    def rescale(self, s: torch.Tensor) -> None:
        s = s.cpu().float()
        self.samples = {i: (x / s, a) for i, (x, a) in self.samples.items()}

    def reduce(self, comm: Comm) -> None:
        if comm.world == 1:
            return
        state = self.state_dict()
        parts = {k: comm.gather(v) for k, v in state.items()}
        self.load_state_dict({k: torch.cat(v) for k, v in parts.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        order = sorted(self.samples)
        return {
            "x": torch.cat([self.samples[i][0] for i in order]),
            "a": torch.cat([self.samples[i][1] for i in order]),
            "sample": torch.cat([torch.full((len(self.samples[i][1]),), i, dtype=torch.int64) for i in order]),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.samples = {}
        for i in torch.unique(state["sample"]).tolist():
            rows = state["sample"] == i
            self.samples[int(i)] = (state["x"][rows], state["a"][rows])


@STATISTICS.register
class AbsMaxStatistic(Statistic):
    """Per input channel ``max_t |x_t|`` over every token."""

    kind = "absmax"

    def __init__(self, **_: object) -> None:
        self.absmax: torch.Tensor | None = None

    def update(self, x: torch.Tensor, a: torch.Tensor, sample: int, reference: torch.Tensor | None = None) -> None:
        amax = x.abs().amax(0) if x.shape[0] else x.new_zeros(x.shape[1])
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)

    def footprint(self, in_features: int, samples: int) -> int:
        return in_features * 4

    def rescale(self, s: torch.Tensor) -> None:
        if self.absmax is not None:
            self.absmax = self.absmax / s.to(self.absmax.device)

    def reduce(self, comm: Comm) -> None:
        comm.all_reduce_(self.absmax, op="max")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.absmax = state["absmax"]


@STATISTICS.register
class InputRangeStatistic(AbsMaxStatistic):
    """Per input channel ``max_t |x_t|`` of the input before activation quantization: the calibrated range of
    activation formats with a static global scale (NVFP4 activations)."""

    kind = "input_range"
    raw = True

    def tensor_absmax(self) -> torch.Tensor:
        """The largest magnitude over every channel (0 before any token)."""
        return torch.zeros(()) if self.absmax is None or not self.absmax.numel() else self.absmax.max()


@STATISTICS.register
class CrossStatistic(Statistic):
    """``C = sum_t a_t r_t x_t^T`` and ``mass = sum_t a_t`` (float64 sums), with ``x_t`` a token's exposed input
    and ``r_t`` the same token's input when the full-precision layer runs on the full-precision layer input:
    the cross term of the asymmetric GPTQ objective (:mod:`tlq_hf.solvers.gptaq`). ``[in, in]``, not symmetric.
    """

    kind = "cross"
    paired = True

    def __init__(self, **_: object) -> None:
        self.sum: torch.Tensor | None = None
        self.mass = 0.0

    def update(self, x: torch.Tensor, a: torch.Tensor, sample: int, reference: torch.Tensor | None = None) -> None:
        if reference is None or reference.shape != x.shape:
            raise RuntimeError("the cross statistic needs the full-precision input of the same tokens")
        keep = a > 0
        x, r, a = x[keep].float(), reference[keep].float(), a[keep].float()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.sum.add_((r * a[:, None]).T @ x)
        self.mass += float(a.double().sum())

    def footprint(self, in_features: int, samples: int) -> int:
        return in_features * in_features * 8

    def rescale(self, s: torch.Tensor) -> None:
        if self.sum is not None:  # both inputs are divided by s (the target weight is multiplied by it)
            inv = 1.0 / s.to(self.sum.device, torch.float64)
            self.sum.mul_(inv[:, None]).mul_(inv[None, :])

    def reduce(self, comm: Comm) -> None:
        if comm.world == 1:
            return
        if self.sum is None:
            raise RuntimeError("a rank saw no tokens for a module: use at least as many samples as processes")
        comm.all_reduce_(self.sum)
        (self.mass,) = comm.sum(self.mass)

    def normalized(self) -> torch.Tensor:
        """``C / sum_t a_t`` (float32)."""
        if self.sum is None:
            raise RuntimeError("no calibration tokens reached this module")
        return (self.sum / max(self.mass, 1e-12)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "mass": torch.tensor(self.mass, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sum, self.mass = state["sum"], float(state["mass"])


@dataclass
class StatGroup:
    """Target modules that read the same input with the same token weights, and the statistics of that input.

    ``input_of`` names the module whose input hook feeds the group when that is not ``members[0]`` (a group
    of one module inside a larger shared input, when each module has its own token weights).
    """

    members: list[str]
    stats: dict[str, Statistic] = field(default_factory=dict)
    input_of: str | None = None
    tokens: int = 0  # token rows that reached the group's input (over all ranks after :meth:`reduce`)
    width: int = 0  # input channels (known once a row arrived)
    fallback: bool = False  # too few tokens (see :meth:`reduce`): solved without data

    def rescale(self, s: torch.Tensor) -> None:
        for stat in self.stats.values():
            stat.rescale(s)

    def reduce(self, comm: Comm, min_tokens: int = 0) -> None:
        """Combine the ranks' statistics. With fewer than ``min_tokens`` tokens (at least one) over all ranks the
        statistics are dropped and :attr:`fallback` set: the group is solved without data. A rank that saw no
        token of a group that others did (an expert its samples never reached) joins with empty statistics."""
        local = self.tokens
        (tokens,) = comm.sum(float(local))
        self.tokens = int(tokens)
        if comm.world > 1:
            width = torch.tensor([float(self.width)])
            comm.all_reduce_(width, op="max")
            self.width = int(width)
        if self.tokens < max(min_tokens, 1):
            self.stats.clear()
            self.fallback = True
            return
        if local == 0:  # empty updates give every statistic its zero state
            empty = torch.zeros(0, self.width)
            for stat in self.stats.values():
                stat.update(empty, torch.zeros(0), -1, empty if stat.paired else None)
        for stat in self.stats.values():
            stat.reduce(comm)


def shared_input_groups(
    modules: dict[str, nn.Module], run_one: Callable[[], object], calls: dict[str, int] | None = None
) -> list[list[str]]:
    """Partition ``modules`` by the input tensor they receive during ``run_one()`` (one layer forward).

    Inputs are held until the forward returns, so two modules share a group only if they received the very
    same tensor object. Modules never called form groups of their own. Group order follows call order.
    ``calls``, if given, receives how many times each called module was called in that forward.
    """
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def record(module, args):
            seen.append((name, args[0]))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        run_one()
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    placed = set()
    for name, tensor in seen:
        if calls is not None:
            calls[name] = calls.get(name, 0) + 1
        if name in placed:
            continue
        placed.add(name)
        for source, members in groups:
            if source is tensor:
                members.append(name)
                break
        else:
            groups.append((tensor, [name]))
    return [members for _, members in groups] + [[n] for n in modules if n not in placed]


class _PassComplete(Exception):
    """Raised by a :class:`StatCollector` hook to end a forward whose remaining part feeds no statistic."""


class StatCollector:
    """Forward pre-hooks, one per shared input (on the module that reads it first), feeding every group that
    reads that input: the input is fake-quantized and flattened once, however many groups it feeds.

    Before each sample's forward, :meth:`begin` names the sample and each group's token weights (``None``:
    uniform), in the order of ``groups``. With an activation format (``act``) the statistics see the fake-quantized
    activations the packed layer will compute with (NVFP4 activations under the global scale of the rows at hand:
    the layer's own is calibrated from these inputs), except :attr:`~Statistic.raw` ones, which see the input.
    When a statistic is :attr:`~Statistic.paired`, each sample's full-precision forward runs first inside
    :meth:`reference`, which records every shared input (un-quantized: the target is the full-precision output)
    for the paired updates of the exposed forward.

    A pass whose layer output is not needed may stop each forward early: given ``calls`` (module name -> calls per
    layer forward, from the probe of :func:`shared_input_groups`), :meth:`run` and :meth:`reference` with
    ``complete=False`` end the forward as soon as every hook of this collector has fired that often (a dense
    layer's attention-side statistics skip the MLP). A hook that fires fewer times (an expert the router did not
    choose) lets the forward run to its end.
    """

    def __init__(
        self,
        groups: list[StatGroup],
        modules: dict[str, nn.Module],
        act: ActFormat | None,
        calls: dict[str, int] | None = None,
    ) -> None:
        self.groups, self.act = groups, act
        self.sample = 0
        self.weights: list[torch.Tensor | None] = [None] * len(groups)
        readers: dict[int, list[int]] = {}  # id of the module that gets the input first -> groups it feeds
        first: dict[int, nn.Module] = {}
        expected: dict[int, int | None] = {}  # id of a hooked module -> its calls per forward (None: unknown)
        for i, g in enumerate(groups):
            name = g.input_of or g.members[0]
            module = modules[name]
            readers.setdefault(id(module), []).append(i)
            first[id(module)] = module
            expected[id(module)] = None if calls is None else calls.get(name)
        self.first = first
        self.expected = None if None in expected.values() else expected
        self.fired: dict[int, int] | None = None  # hook calls of the current forward, when it may stop early
        self.references: dict[int, torch.Tensor] = {}
        self.paired = any(stat.paired for g in groups for stat in g.stats.values())
        self.raw = act is not None and any(stat.raw for g in groups for stat in g.stats.values())
        self.handles = [first[k].register_forward_pre_hook(self._hook(k, idx)) for k, idx in readers.items()]
        self.recording = False

    def reference(self, run: Callable[[], T], complete: bool = True) -> T | None:
        """Run ``run()`` (the full-precision layer on this sample's full-precision input), keeping each shared
        input as the reference of the next exposed forward; statistics are not updated. Returns ``run()`` (``None``
        if, with ``complete=False``, it stopped early)."""
        self.references, self.recording = {}, True
        try:
            with every_token_to_every_expert():  # an expert's reference rows for every token: the exposed
                return self.run(run, complete)  # forward's routing may differ; its rows are picked from these
        finally:
            self.recording = False

    def run(self, forward: Callable[[], T], complete: bool = True) -> T | None:
        """``forward()`` (one layer forward feeding this collector's hooks); with ``complete=False`` it ends as soon
        as every hook has fired as often as in the probe forward, and ``None`` is returned."""
        if complete or self.expected is None:
            return forward()
        self.fired = dict.fromkeys(self.expected, 0)
        try:
            return forward()
        except _PassComplete:
            return None
        finally:
            self.fired = None

    def _count(self, key: int) -> None:
        """One more call of hook ``key``; ends the forward once every hook has fired as often as expected."""
        if self.fired is None:
            return
        self.fired[key] += 1
        if all(self.fired[k] >= n for k, n in self.expected.items()):
            raise _PassComplete

    def begin(self, sample: int, weights: list[torch.Tensor | None]) -> None:
        self.sample, self.weights = sample, weights

    def _hook(self, key: int, indices: list[int]):
        def hook(module, args):
            x = args[0].detach()
            if self.recording:
                self.references[key] = x.reshape(-1, x.shape[-1]).float()
                self._count(key)
                return
            width = x.shape[-1]
            quantized = (x if self.act is None else self.act.fake_quantize(x)).reshape(-1, width).float()
            raw = x.reshape(-1, width).float() if self.raw else quantized  # for the statistics that read the input
            x = quantized
            reference = self.references.pop(key, None)
            if self.paired and reference is None:
                raise RuntimeError("a paired statistic needs StatCollector.reference() before each exposed forward")
            routed = routed_tokens()  # inside an expert: the positions of the rows it receives among all tokens
            if routed is not None and reference is not None:  # references hold every token (see reference())
                reference = reference[routed.to(reference.device)]
            for index in indices:
                a = self.weights[index]
                if a is None:
                    a = torch.ones(x.shape[0], device=x.device)
                else:
                    a = a.to(x.device).float()
                    a = a[routed.to(a.device)] if routed is not None else a
                group = self.groups[index]
                group.tokens += x.shape[0]
                group.width = x.shape[1]
                for stat in group.stats.values():
                    stat.update(raw if stat.raw else x, a, self.sample, reference)
            self._count(key)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
