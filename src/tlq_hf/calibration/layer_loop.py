"""Quantization-exposed layer-wise calibration.

For ``l = 0..L-1`` the loop carries a :class:`LoopState`: the full-precision input ``X_fp[l]`` and the
exposed input ``X_in[l]`` (what the already-quantized layers ``0..l-1`` produce; the same store when
``exposed=False``), one tensor per sample of this rank, in :class:`ActivationStore` objects. One step:

1. onload layer ``l`` (from the device map's CPU / disk copy, float32 on CPU);
2. full-precision target ``Y_fp = f(X_fp)``: read from the gradient pass's kept boundaries when there are
   any (``fp_boundaries``, on disk when spilled), else recomputed here;
3. passes of the full-precision layer on ``X_in`` feed the statistics of each group of modules that read
   the same input (:mod:`.stats`), weighted by token importance; statistics are reduced over ranks. When
   one layer's statistics would exceed ``LayerSettings.statistics_budget`` they are collected in several
   passes (:func:`statistic_passes`, the largest last), each solved before the next is collected, so only
   one pass's statistics are ever alive (same result). The pass whose inputs come last in the layer runs the
   whole layer (its output measures the error carried in); every other pass stops each forward once its own
   inputs have been seen (a dense layer's attention-side pass skips the MLP);
4. smoothing (AWQ / SmoothQuant) folds per-channel scales and rescales the statistics it invalidates;
5. each group is solved once, by its owner rank, and broadcast; packed modules replace the linears once no
   pass needs the full-precision ones any more;
6. the quantized layer's output on ``X_in`` is the next ``X_in``.

The report gives, per layer, the importance-weighted relative error of the layer output against ``Y_fp``:
``before`` (full-precision layer on ``X_in``: the error carried in) and ``after`` (quantized layer).
Solvers and smoothers are looked up by name in :data:`tlq_hf.solvers.LAYER_SOLVERS` and
:data:`tlq_hf.solvers.SMOOTHERS` (each registered beside its algorithm in ``solvers/``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack
from ..experts import every_token_to_every_expert, expert_index, experts_clock, only_experts
from ..hostmem import release_host_memory
from ..nn import dequant_cache
from ..qtypes import QuantScheme
from ..solvers import LAYER_SOLVERS, SMOOTHERS, solve_rtn
from .activations import ActivationStore
from .capture import CapturedSample, layer_forward, to_device
from .distributed import Comm
from .importance import TokenWeighting
from .install import Installer
from .journal import ModelEdits
from .offload import onloaded
from .schedule import SolveScheduler
from .smoothing import Smoothing
from .stats import STATISTICS, StatCollector, StatGroup, shared_input_groups
from .targets import FullPrecisionTargets

__all__ = [
    "CalibrationData",
    "LayerSettings",
    "LayerReport",
    "LoopState",
    "LayerLoop",
    "statistic_passes",
    "ONE_PASS_SLACK",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSettings:
    """How each layer is calibrated (a method's recipe resolved against the config)."""

    solver: str = "gptq"  # a name in tlq_hf.solvers.LAYER_SOLVERS
    smoothing: str | None = None  # None or a name in tlq_hf.solvers.SMOOTHERS
    exposed: bool = True
    damp: float = 0.01
    act_order: bool = True
    smooth_alpha: float = 0.5
    awq_grid: int = 20
    max_tokens: int = 4096  # rows kept per group (over all samples) for the input-keeping solvers
    # bytes one layer's statistics may take before they are collected in several passes (see statistic_passes)
    statistics_budget: int = 256 << 20
    # MoE experts: an expert's projections whose input saw fewer tokens are rounded to nearest instead
    expert_min_tokens: int = 32
    # MoE experts: statistics from every token for every expert (the forward keeps the router's choice)
    expert_all_tokens: bool = False


@dataclass
class LayerReport:
    index: int
    error_before: float
    error_after: float
    seconds: float
    # MoE layers: experts module -> tokens that reached each expert's first projection (statistics pass)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    # projections solved without data (too few tokens: rounded to nearest)
    fallbacks: list[str] = field(default_factory=list)
    # wall seconds of the step's parts: "onload" (the layer read into memory), "statistics" (full-precision targets
    # and statistics passes), "solve" (smoothing, solves, installs), "output" (the quantized layer's output),
    # "settle" (the packed layer put back, e.g. written to disk); "experts_forward" (inside experts modules, during
    # any of them) and "experts_solve" (solving expert projections) are parts of those
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class CalibrationData:
    """This rank's captured samples and where the layer loop keeps their activations."""

    captured: list[CapturedSample]
    samples: list[int] | None = None  # each captured sample's index in the whole calibration set (this rank's shard)
    total_samples: int | None = None  # over all ranks
    comm: Comm | None = None
    spill_dir: str | None = None  # activations on disk here, else in host memory
    fp_boundaries: list[ActivationStore] | None = None  # the gradient pass's X[0..L]: targets read, not recomputed


@dataclass
class LoopState:
    """Everything the loop carries from one layer to the next (and what a resumed run restores)."""

    layer: int  # the next layer to calibrate
    x_fp: ActivationStore  # full-precision input of ``layer``, this rank's samples
    x_in: ActivationStore  # exposed input of ``layer`` (``x_fp`` itself when not exposed)
    reports: list[LayerReport] = field(default_factory=list)

    def close(self) -> None:
        """Drop the stores (once each: ``x_in`` may be ``x_fp``)."""
        for store in {id(s): s for s in (self.x_fp, self.x_in)}.values():
            store.close()


#: one statistics pass whenever all of a layer's statistics fit in this multiple of its largest shared input's
ONE_PASS_SLACK = 1.25


def statistic_passes(
    groups: list[StatGroup],
    footprint: Callable[[StatGroup], int],
    budget: int,
    bin_of: Callable[[StatGroup], str | None] | None = None,
) -> list[list[int]]:
    """Indices of ``groups`` per statistics pass, so that no pass holds more than ``budget`` bytes of statistics
    (or the largest shared input's, if that alone is more).

    Groups that read the same input (same ``input_of``) stay in one pass: their input hook is shared. Inputs
    are packed largest first into the first pass with room; passes are returned smallest first (the largest
    statistic, solved last, then overlaps only with the packed forms of the others). Group order within a pass
    is call order. One pass when everything fits, or when everything is within :data:`ONE_PASS_SLACK` of the
    largest shared input's statistics (a dense layer's down projection: another pass would cost one more forward
    of the layer to cut the peak by less than a fifth). When several are needed, groups of different ``bin_of`` (the
    experts module a group belongs to, ``None`` for other modules) never share a pass, so a pass over some
    experts of a layer needs to run only those experts (:func:`tlq_hf.experts.only_experts`).
    """
    units: dict[str, list[int]] = {}
    for k, g in enumerate(groups):
        units.setdefault(g.input_of or g.members[0], []).append(k)
    size = {key: sum(footprint(groups[k]) for k in ks) for key, ks in units.items()}
    capacity = max([budget, *size.values()])
    if sum(size.values()) <= max(capacity, ONE_PASS_SLACK * max(size.values())):
        return [list(range(len(groups)))]
    binned = bin_of or (lambda g: None)
    passes: list[list[str]] = []
    load: list[int] = []
    bins: list[str | None] = []
    for key in sorted(units, key=lambda u: -size[u]):  # stable: ties keep call order
        b = binned(groups[units[key][0]])
        for p in range(len(passes)):
            if bins[p] == b and load[p] + size[key] <= capacity:
                passes[p].append(key)
                load[p] += size[key]
                break
        else:
            passes.append([key])
            load.append(size[key])
            bins.append(b)
    order = sorted(range(len(passes)), key=lambda p: (max(size[u] for u in passes[p]), p))
    return [sorted(k for key in passes[p] for k in units[key]) for p in order]


def _lap(phases: dict[str, float], key: str, since: float) -> float:
    """Add the seconds since ``since`` to ``phases[key]``; return now."""
    now = time.perf_counter()
    phases[key] += now - since
    return now


class _ErrorSum:
    """Importance-weighted ``sum_t a_t ||y_t - r_t||^2`` and ``sum_t a_t ||r_t||^2`` over samples."""

    def __init__(self) -> None:
        self.num = self.den = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor, a: torch.Tensor | None) -> None:
        a = torch.ones(ref.shape[1]) if a is None else a.float()
        self.num += float((a * (out.float() - ref.float()).pow(2).sum(-1)[0].cpu()).sum())
        self.den += float((a * ref.float().pow(2).sum(-1)[0].cpu()).sum())

    def value(self, comm: Comm) -> float:
        num, den = comm.sum(self.num, self.den)
        return num / max(den, 1e-30)


class LayerLoop:
    """The exposed layer-wise calibration of one decoder stack; ``swap(name, module)`` installs packed linears."""

    def __init__(
        self,
        model: nn.Module,
        stack: DecoderStack,
        targets: dict[str, nn.Linear],
        data: CalibrationData,
        scheme: QuantScheme,
        settings: LayerSettings,
        weighting: TokenWeighting | None,
        edits: ModelEdits,
    ) -> None:
        self.model, self.stack, self.targets, self.captured = model, stack, targets, data.captured
        self.edits = edits  # every swap, in-place write and re-homing goes through it (undo on failure)
        self.scheme, self.cfg, self.weighting = scheme, settings, weighting
        self.samples = list(range(len(data.captured))) if data.samples is None else data.samples
        self.total_samples = data.total_samples or len(data.captured)
        self.comm, self.spill_dir = data.comm or Comm(), data.spill_dir
        self.fp_boundaries = data.fp_boundaries  # X[0..L] of the full-precision model, or None (recompute)
        self.solver = LAYER_SOLVERS[settings.solver]
        self.scheduler = SolveScheduler(self.comm)
        self.smoothing = None
        if settings.smoothing is not None:
            smoother = SMOOTHERS[settings.smoothing]
            self.smoothing = Smoothing(model, smoother, scheme, settings, self.comm, edits)

    @property
    def needs(self) -> set[str]:
        """The statistics kinds the solver and the smoother read (and the input range, for activations quantized
        under a calibrated global scale)."""
        ranged = {"input_range"} if self.scheme.calibrated_activations else set()
        return set(self.solver.needs) | set(self.smoothing.smoother.needs if self.smoothing else ()) | ranged

    def initial_state(self) -> LoopState:
        if self.fp_boundaries is not None:
            x = self.fp_boundaries[0]
        else:
            x = ActivationStore.of([s.hidden for s in self.captured], self.spill_dir, "x_in")
        return LoopState(0, x, x)

    def run(self, state: LoopState, on_layer_done: Callable[[LoopState], None] | None = None) -> list[LayerReport]:
        """Calibrate layers ``state.layer .. L-1``; ``on_layer_done(state)`` after each (e.g. a checkpoint)."""
        n = len(self.stack.layers)
        bar = tqdm(total=n, initial=state.layer, desc=f"tlq layers ({self.cfg.solver})", unit="layer")
        while state.layer < n:
            self.step(state)
            bar.update(1)
            if on_layer_done is not None:
                on_layer_done(state)
        bar.close()
        return state.reports

    def step(self, state: LoopState) -> None:
        """Calibrate layer ``state.layer`` and advance ``state`` to the next one."""
        start = time.perf_counter()
        step = _LayerStep(self, state)
        step.run()
        report = step.report(time.perf_counter() - start)
        state.close()
        state.layer, state.x_fp, state.x_in = state.layer + 1, step.targets.store, step.y_in
        state.reports.append(report)
        release_host_memory()

    def _groups(
        self, modules: dict[str, nn.Module], run_one: Callable[[], object], calls: dict[str, int]
    ) -> list[StatGroup]:
        """One group per shared input, split where token weights differ between its modules (see :mod:`.stats`), in
        call order; ``calls`` receives each called module's calls per layer forward."""
        rows = max(1, -(-self.cfg.max_tokens // self.total_samples))
        groups = []
        with every_token_to_every_expert():  # every expert called once: its projections' shared inputs seen
            shared = shared_input_groups(modules, run_one, calls)
        for members in shared:
            split = [members] if self.weighting is None else self.weighting.partition(members)
            for part in split:
                stats = {k: STATISTICS[k](rows_per_sample=rows) for k in sorted(self.needs)}
                groups.append(StatGroup(part, stats, input_of=members[0]))
        return groups


def _input_global_scales(part: list[StatGroup], scheme: QuantScheme) -> dict[int, torch.Tensor] | None:
    """Each group's activation global scale from its calibrated input range (``None`` when the scheme's activations
    have none). A group that fell back for too few tokens takes the widest range of the pass's other groups."""
    if not scheme.calibrated_activations:
        return None
    act = scheme.act_format
    ranges = {id(g): g.stats["input_range"].tensor_absmax() for g in part if "input_range" in g.stats}
    widest = max(ranges.values(), default=torch.zeros(()))
    return {id(g): act.global_scale(ranges.get(id(g), widest)) for g in part}


class _LayerStep:
    """One layer's calibration, read as the algorithm (:meth:`run`): full-precision targets, statistics passes
    (each solved and installed before the next is collected), the quantized layer's output, the report."""

    def __init__(self, loop: LayerLoop, state: LoopState) -> None:
        self.loop, self.state, self.cfg = loop, state, loop.cfg
        self.index = i = state.layer
        self.layer = loop.stack.layers[i]
        self.prefix = loop.stack.layer_prefix(i) + "."
        self.lw = loop.weighting.for_layer(i) if loop.weighting is not None else [None] * len(loop.captured)
        self.before, self.after = _ErrorSum(), _ErrorSum()
        self.phases = dict.fromkeys(("onload", "statistics", "solve", "output", "settle", "experts_solve"), 0.0)
        self.fallbacks: list[str] = []
        self.expert_tokens: dict[str, dict[int, int]] = {}
        self._mark = time.perf_counter()

    def _lap(self, phase: str) -> None:
        self._mark = _lap(self.phases, phase, self._mark)

    def forward(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Layer output for sample ``j`` as the next layer gets it (e.g. deepstack features added)."""
        y = layer_forward(self.layer, x.to(self.on.device, self.on.compute_dtype), self.kwargs[j])
        return self.loop.captured[j].after_layer(self.index, y)

    def run_one(self) -> torch.Tensor:
        """The layer on the first sample (probes: which modules share an input, whether a fold keeps the output)."""
        return self.forward(self.state.x_in[0], 0)

    def run(self) -> None:
        loop, cfg, state = self.loop, self.cfg, self.state
        paired = any(STATISTICS[kind].paired for kind in loop.solver.needs)
        loop.edits.will_rehome(self.layer)
        with torch.no_grad(), onloaded(self.layer, keep=True, scratch=True) as on, experts_clock(self.layer) as clock:
            self.on = on
            self.kwargs = [to_device(s.kwargs_for(self.index), on.device, on.compute_dtype) for s in loop.captured]
            self._lap("onload")
            self.targets = FullPrecisionTargets.for_layer(
                self.index, loop.fp_boundaries, cfg.exposed, paired, loop.spill_dir, on.store_dtype
            )
            self.y_in = ActivationStore(loop.spill_dir, "x_in") if cfg.exposed else self.targets.store
            self.targets.before_statistics(self.forward, state.x_fp)
            self.live = {
                n: self.layer.get_submodule(n[len(self.prefix) :]) for n in loop.targets if n.startswith(self.prefix)
            }
            self.experts = {n: e for n in self.live if (e := expert_index(n, loop.model)) is not None}
            self.calls: dict[str, int] = {}
            groups = loop._groups(self.live, self.run_one, self.calls)
            passes = self._passes(groups)
            whole = max(range(len(passes)), key=lambda k: max(passes[k]))  # the pass reading the layer's last input
            installer = Installer(loop.edits, self.live, on)
            for k, indices in enumerate(passes):
                part = [groups[g] for g in indices]
                self.collect(part, whole=k == whole)
                self._lap("statistics")
                self.solve(part, installer, last=k == len(passes) - 1)
                self._lap("solve")
            del groups, installer
            self.output()
            self._lap("output")
        self._lap("settle")
        self.phases["experts_forward"] = clock.seconds
        del self.live, self.kwargs

    def _passes(self, groups: list[StatGroup]) -> list[list[int]]:
        """Group indices per statistics pass (:func:`statistic_passes`); one pass when smoothing (a fold may touch
        modules of another pass)."""
        if self.loop.smoothing is not None:
            return [list(range(len(groups)))]
        live, samples = self.live, len(self.state.x_in)

        def footprint(group: StatGroup) -> int:
            width = live[group.members[0]].weight.shape[1]
            return sum(stat.footprint(width, samples) for stat in group.stats.values())

        def owner_of(group: StatGroup) -> str | None:
            return self.experts[group.members[0]][0] if group.members[0] in self.experts else None

        return statistic_passes(groups, footprint, self.cfg.statistics_budget, owner_of)

    def collect(self, part: list[StatGroup], whole: bool) -> None:
        """One statistics pass over this rank's samples for the groups ``part``, reduced over ranks. The ``whole``
        pass runs the whole layer: it measures the error carried in and yields the targets of the sources that
        come from it; another pass discards the layer output, stops each forward once its inputs were seen and
        runs only its own experts where it can."""
        loop, cfg, state = self.loop, self.cfg, self.state
        collector = StatCollector(part, self.live, loop.scheme.act_format, calls=None if whole else self.calls)
        only = contextlib.nullcontext if whole else self._only_experts(part)
        weights = [loop.weighting.for_modules(g.members) if loop.weighting else None for g in part]
        try:
            for j, x in enumerate(state.x_in):
                collector.begin(loop.samples[j], [w[j] if w is not None else None for w in weights])
                if collector.paired:  # the full-precision inputs of the same tokens, first
                    y_ref = collector.reference(lambda j=j: self.forward(state.x_fp[j], j), complete=whole)
                    if whole:
                        self.targets.from_reference(y_ref)
                    del y_ref
                with every_token_to_every_expert(cfg.expert_all_tokens), only():  # statistics only
                    y = collector.run(lambda j=j, x=x: self.forward(x, j), complete=whole)
                if not whole:
                    continue
                if cfg.exposed:
                    self.before.add(y, self.targets.store[j], self.lw[j])
                else:
                    self.targets.from_statistics(y)
        finally:
            collector.close()
        del weights, collector
        for g in part:
            g.reduce(loop.comm, cfg.expert_min_tokens if g.members[0] in self.experts else 0)

    def _only_experts(self, part: list[StatGroup]) -> Callable[[], contextlib.AbstractContextManager]:
        """The context of each forward of a pass other than the whole one (its layer output is discarded): when the
        pass's groups are all experts of one experts module, only those experts run (the others' inputs and outputs
        feed no statistic of the pass)."""
        experts = self.experts
        owners = {experts[m][0] if m in experts else None for g in part for m in g.members}
        if len(owners) != 1 or None in owners:
            return contextlib.nullcontext
        (owner,) = owners
        chosen = {experts[m][1] for g in part for m in g.members}
        return functools.partial(only_experts, self.layer.get_submodule(owner[len(self.prefix) :]), chosen)

    def solve(self, part: list[StatGroup], installer: Installer, last: bool) -> None:
        """Smooth (if the method does), then solve each group on its owner rank and install it: at once in the last
        pass, else once no pass needs the full-precision linears any more."""
        loop, cfg, dtype = self.loop, self.cfg, self.on.store_dtype
        if loop.smoothing is not None:
            loop.smoothing.apply(self.layer, part, self.prefix, self.on.compute_dtype, self.run_one)
        if last:
            installer.flush()

        def solve_of(group: StatGroup):
            solve = solve_rtn if group.fallback else loop.solver.solve
            return lambda weights, g: solve(weights, g, loop.scheme, cfg, dtype)

        def shares_rows(group: StatGroup) -> bool:
            return loop.solver.shares_rows and not group.fallback

        input_scales = _input_global_scales(part, loop.scheme)  # read before the solves release the statistics
        solved = loop.scheduler.solve(part, self.live, solve_of, loop.scheme, dtype, shares_rows)
        for group, packed, seconds in solved:
            if input_scales is not None:
                for module in packed.values():
                    module.input_global_scale.copy_(input_scales[id(group)])
            (installer.install if last else installer.defer)(packed)
            if group.members[0] in self.experts:
                self.phases["experts_solve"] += seconds
        for g in part:
            if g.fallback:
                self.fallbacks += g.members
            if g.members[0] in self.experts and not g.members[0].endswith(".down_proj"):  # the expert's input
                owner, e = self.experts[g.members[0]]
                self.expert_tokens.setdefault(owner, {}).setdefault(e, g.tokens)

    def output(self) -> None:
        """The quantized layer on the exposed inputs: the error left after it and the next layer's inputs."""
        with dequant_cache(self.layer):
            for j, x in enumerate(self.state.x_in):
                y = self.forward(x, j)
                self.after.add(y, self.targets.store[j], self.lw[j])
                if self.cfg.exposed:
                    self.y_in.append(y.to(self.on.store_dtype))

    def report(self, seconds: float) -> LayerReport:
        loop, i = self.loop, self.index
        report = LayerReport(i, self.before.value(loop.comm), self.after.value(loop.comm), seconds)
        report.phases = {k: round(v, 3) for k, v in self.phases.items()}
        report.expert_tokens = {
            o: [t.get(e, 0) for e in range(len(loop.model.get_submodule(o)))] for o, t in self.expert_tokens.items()
        }
        report.fallbacks = sorted(self.fallbacks)
        logger.info("tlq layer %d: weighted rel. error %.3e -> %.3e", i, report.error_before, report.error_after)
        if report.fallbacks:
            logger.info(
                "tlq layer %d: %d projections saw fewer than %d tokens and were rounded to nearest: %s",
                i,
                len(report.fallbacks),
                self.cfg.expert_min_tokens,
                ", ".join(report.fallbacks),
            )
        return report
