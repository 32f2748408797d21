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
   one pass's statistics are ever alive (one extra forward per extra pass; same result);
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

from ..arch import DecoderStack, smooth_mappings
from ..experts import every_token_to_every_expert, expert_index, experts_clock, only_experts
from ..hostmem import release_host_memory
from ..nn import TLQLinear, dequant_cache
from ..primitives import QParams
from ..qtypes import QuantScheme
from ..solvers import LAYER_SOLVERS, SMOOTHERS, Solution, solve_rtn
from .activations import ActivationStore
from .capture import CapturedSample, layer_forward, to_device
from .distributed import Comm
from .importance import TokenWeighting
from .journal import ModelEdits
from .offload import Onloaded, onloaded
from .stats import STATISTICS, StatCollector, StatGroup, shared_input_groups

__all__ = [
    "LayerSettings",
    "LayerReport",
    "LoopState",
    "LayerLoop",
    "statistic_passes",
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


@torch.no_grad()
def weight_offset(norm: nn.Module) -> float:
    """``c`` in ``norm(x) = x_hat * (weight + c) (+ bias)``: 0 for LayerNorm / Llama-style RMSNorm, 1 for
    Gemma's ``x_hat * (1 + weight)``.

    Found by evaluating ``norm`` on a fixed input with its weight set to 0 and to 1 (and bias 0); its tensors are
    restored afterwards. Raises ``ValueError`` if the output is not of that form (no scale can be folded in).
    """
    weight, bias = norm.weight, getattr(norm, "bias", None)
    saved = [(t, t.detach().clone()) for t in (weight, bias) if t is not None]
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        if bias is not None:
            bias.zero_()
        weight.zero_()
        at_zero = norm(x).float()
        weight.fill_(1.0)
        unit = norm(x).float() - at_zero  # x_hat
    finally:
        for t, value in saved:
            t.copy_(value)
    c = float((at_zero * unit).sum() / (unit * unit).sum().clamp_min(1e-30))
    if abs(c - round(c)) < 1e-2:  # the conventions in use are 0 and 1; half-precision probes land near them
        c = float(round(c))
    if not torch.allclose(at_zero, c * unit, rtol=1e-2, atol=1e-3 * float(unit.abs().max())):
        raise ValueError(f"{type(norm).__name__} is not x_hat * (weight + c): no per-channel scale can be folded in")
    return c


def _fold(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """``producer`` output / s, consumers' input columns * s: the layer function is unchanged.

    A linear producer's output rows (and bias) are divided by ``s``; a norm's ``weight + c`` (see
    :func:`weight_offset`) and bias are. Computed in float32 whatever the stored dtype (a half-precision weight
    is rounded once, after scaling).
    """
    s = s.float()
    with torch.no_grad():
        w = producer.weight
        if w.ndim == 2:
            w.copy_(w.float() / s[:, None])
        else:
            c = weight_offset(producer)
            w.copy_((w.float() + c) / s - c)
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_(producer.bias.float() / s)
        for consumer in consumers:
            consumer.weight.copy_(consumer.weight.float() * s[None, :])


def _probe_scale(width: int, device: torch.device) -> torch.Tensor:
    """Per-channel scales of 1/2 or 2 (fixed pattern): multiplying and dividing by them is exact in floating point."""
    signs = torch.randint(0, 2, (width,), generator=torch.Generator().manual_seed(width))
    return (2.0 ** (2 * signs - 1).float()).to(device)


@torch.no_grad()
def folds_preserve_output(
    layer: nn.Module, producer: str, consumers: list[str], run_one: Callable[[], torch.Tensor]
) -> bool:
    """Whether folding a per-channel scale from ``producer`` into ``consumers`` (names inside ``layer``) leaves the
    layer's output unchanged, i.e. the consumers read the producer's output through channel-wise linear steps only.

    The fold is emulated with hooks (the producer's output divided, the consumers' inputs multiplied by a
    power-of-two probe scale; no weight is touched) around one forward ``run_one()``; with power-of-two scales a
    valid mapping reproduces the output exactly (accepted up to 1e-3 relative, for kernels that are not
    deterministic), an invalid one typically moves it by tens of percent. Catches, e.g., a norm applied to a
    branch output rather than to the consumers' input (Gemma's ``post_attention_layernorm``: the MLP reads
    ``pre_feedforward_layernorm``).
    """
    names = dict(layer.named_modules())
    reference = run_one().float()
    width = names[consumers[0]].weight.shape[1]
    s = _probe_scale(width, reference.device)
    handles = [names[producer].register_forward_hook(lambda m, args, out: out / s.to(out.dtype))]
    handles += [
        names[c].register_forward_pre_hook(lambda m, args: (args[0] * s.to(args[0].dtype), *args[1:]))
        for c in consumers
    ]
    try:
        folded = run_one().float()
    finally:
        for h in handles:
            h.remove()
    err = float((folded - reference).norm() / reference.norm().clamp_min(1e-30))
    return err <= 1e-3


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
    is call order. One pass when everything fits. When several are needed, groups of different ``bin_of`` (the
    experts module a group belongs to, ``None`` for other modules) never share a pass, so a pass over some
    experts of a layer needs to run only those experts (:func:`tlq_hf.experts.only_experts`).
    """
    units: dict[str, list[int]] = {}
    for k, g in enumerate(groups):
        units.setdefault(g.input_of or g.members[0], []).append(k)
    size = {key: sum(footprint(groups[k]) for k in ks) for key, ks in units.items()}
    capacity = max([budget, *size.values()])
    if sum(size.values()) <= capacity:
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
        captured: list[CapturedSample],
        scheme: QuantScheme,
        settings: LayerSettings,
        weighting: TokenWeighting | None,
        edits: ModelEdits,
        samples: list[int] | None = None,
        total_samples: int | None = None,
        comm: Comm | None = None,
        spill_dir: str | None = None,
        fp_boundaries: list[ActivationStore] | None = None,
    ) -> None:
        self.model, self.stack, self.targets, self.captured = model, stack, targets, captured
        self.edits = edits  # every swap, in-place write and re-homing goes through it (undo on failure)
        self.scheme, self.cfg, self.weighting = scheme, settings, weighting
        self.samples = list(range(len(captured))) if samples is None else samples
        self.total_samples = total_samples or len(captured)
        self.comm, self.spill_dir = comm or Comm(), spill_dir
        self.fp_boundaries = fp_boundaries  # X[0..L] of the full-precision model, or None (recompute)
        self.solver = LAYER_SOLVERS[settings.solver]
        self.smoother = SMOOTHERS[settings.smoothing] if settings.smoothing is not None else None
        # (producer, consumers) names inside a layer -> whether a fold there preserves the layer (checked once)
        self._fold_checked: dict[tuple[str, tuple[str, ...]], bool] = {}

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
        i, cfg, start = state.layer, self.cfg, time.perf_counter()
        layer = self.stack.layers[i]
        prefix = self.stack.layer_prefix(i) + "."
        modules = {n: m for n, m in self.targets.items() if n.startswith(prefix)}
        lw = self.weighting.for_layer(i) if self.weighting is not None else [None] * len(self.captured)
        before, after = _ErrorSum(), _ErrorSum()
        streamed = self.fp_boundaries is not None
        y_fp = self.fp_boundaries[i + 1] if streamed else ActivationStore(self.spill_dir, "x_fp")
        y_in = ActivationStore(self.spill_dir, "x_in") if cfg.exposed else y_fp
        self.edits.will_rehome(layer)
        phases = dict.fromkeys(("onload", "statistics", "solve", "output", "settle", "experts_solve"), 0.0)
        mark = time.perf_counter()
        with torch.no_grad(), onloaded(layer, keep=True, scratch=True) as on, experts_clock(layer) as in_experts:
            kwargs = [to_device(s.kwargs_for(i), on.device, on.compute_dtype) for s in self.captured]
            mark = _lap(phases, "onload", mark)

            def forward(x: torch.Tensor, j: int) -> torch.Tensor:
                y = layer_forward(layer, x.to(on.device, on.compute_dtype), kwargs[j])
                return self.captured[j].after_layer(i, y)  # as the next layer gets it (e.g. deepstack added)

            paired = any(STATISTICS[kind].paired for kind in self.solver.needs)
            fp_in_pass = cfg.exposed and not streamed and paired  # the paired pass runs the FP layer anyway
            if cfg.exposed and not streamed and not fp_in_pass:
                for j, x in enumerate(state.x_fp):
                    y_fp.append(forward(x, j).to(on.store_dtype))
            live = {n: layer.get_submodule(n[len(prefix) :]) for n in modules}
            experts = {n: e for n in live if (e := expert_index(n, self.model)) is not None}
            groups = self._groups(live, lambda: forward(state.x_in[0], 0))
            passes = [list(range(len(groups)))]
            if self.smoother is None:  # a fold may touch modules of another pass: smoothing needs one pass
                footprint = self._footprint(live, len(state.x_in))
                owner_of = lambda g: experts[g.members[0]][0] if g.members[0] in experts else None  # noqa: E731
                passes = statistic_passes(groups, footprint, cfg.statistics_budget, owner_of)
            deferred: dict[str, nn.Module] = {}
            fallbacks: list[str] = []
            expert_tokens: dict[str, dict[int, int]] = {}
            for k, indices in enumerate(passes):
                part = [groups[g] for g in indices]
                collector = StatCollector(part, live, self.scheme.act_bits)
                only = self._only_experts(part, experts, prefix, layer) if k > 0 else contextlib.nullcontext
                weights = [self.weighting.for_modules(g.members) if self.weighting else None for g in part]
                try:
                    for j, x in enumerate(state.x_in):
                        collector.begin(self.samples[j], [w[j] if w is not None else None for w in weights])
                        if collector.paired:  # the full-precision inputs of the same tokens, first
                            y_ref = collector.reference(lambda j=j: forward(state.x_fp[j], j))
                            if fp_in_pass and k == 0:
                                y_fp.append(y_ref.to(on.store_dtype))
                            del y_ref
                        with every_token_to_every_expert(cfg.expert_all_tokens), only():  # statistics only
                            y = forward(x, j)
                        if k > 0:
                            continue
                        if cfg.exposed:
                            before.add(y, y_fp[j], lw[j])
                        elif not streamed:
                            y_fp.append(y.to(on.store_dtype))
                finally:
                    collector.close()
                del weights, collector
                for g in part:
                    g.reduce(self.comm, cfg.expert_min_tokens if g.members[0] in experts else 0)
                mark = _lap(phases, "statistics", mark)
                if self.smoother is not None:
                    self._smooth(layer, part, prefix, on.compute_dtype, lambda: forward(state.x_in[0], 0))
                last = k == len(passes) - 1
                if last:  # no pass needs the full-precision modules any more
                    self._install(deferred, live, on)
                deferred.update(self._solve(live, part, on, install=last, phases=phases))
                for g in part:
                    if g.fallback:
                        fallbacks += g.members
                    if g.members[0] in experts and not g.members[0].endswith(".down_proj"):  # the expert's input
                        owner, e = experts[g.members[0]]
                        per_expert = expert_tokens.setdefault(owner, {})
                        per_expert.setdefault(e, g.tokens)
                mark = _lap(phases, "solve", mark)
            del groups, live
            with dequant_cache(layer):
                for j, x in enumerate(state.x_in):
                    y = forward(x, j)
                    after.add(y, y_fp[j], lw[j])
                    if cfg.exposed:
                        y_in.append(y.to(on.store_dtype))
            mark = _lap(phases, "output", mark)
        _lap(phases, "settle", mark)
        phases["experts_forward"] = in_experts.seconds
        report = LayerReport(i, before.value(self.comm), after.value(self.comm), time.perf_counter() - start)
        report.phases = {k: round(v, 3) for k, v in phases.items()}
        report.expert_tokens = {
            o: [t.get(e, 0) for e in range(len(self.model.get_submodule(o)))] for o, t in expert_tokens.items()
        }
        report.fallbacks = sorted(fallbacks)
        logger.info("tlq layer %d: weighted rel. error %.3e -> %.3e", i, report.error_before, report.error_after)
        if report.fallbacks:
            logger.info(
                "tlq layer %d: %d projections saw fewer than %d tokens and were rounded to nearest: %s",
                i,
                len(report.fallbacks),
                cfg.expert_min_tokens,
                ", ".join(report.fallbacks),
            )
        state.close()
        state.layer, state.x_fp, state.x_in = i + 1, y_fp, y_in
        state.reports.append(report)
        release_host_memory()

    def _groups(self, modules: dict[str, nn.Module], run_one: Callable[[], object]) -> list[StatGroup]:
        """One group per shared input, split where token weights differ between its modules (see :mod:`.stats`)."""
        needs = set(self.solver.needs) | set(self.smoother.needs if self.smoother else ())
        rows = max(1, -(-self.cfg.max_tokens // self.total_samples))
        groups = []
        with every_token_to_every_expert():  # every expert called once: its projections' shared inputs seen
            shared = shared_input_groups(modules, run_one)
        for members in shared:
            split = [members] if self.weighting is None else self.weighting.partition(members)
            for part in split:
                stats = {k: STATISTICS[k](rows_per_sample=rows) for k in sorted(needs)}
                groups.append(StatGroup(part, stats, input_of=members[0]))
        return groups

    @staticmethod
    def _only_experts(
        part: list[StatGroup], experts: dict[str, tuple[str, int]], prefix: str, layer: nn.Module
    ) -> Callable[[], contextlib.AbstractContextManager]:
        """The context of each forward of a pass after the first (its layer output is discarded): when the pass's
        groups are all experts of one experts module, only those experts run (the others' inputs and outputs feed
        no statistic of the pass)."""
        owners = {experts[m][0] if m in experts else None for g in part for m in g.members}
        if len(owners) != 1 or None in owners:
            return contextlib.nullcontext
        (owner,) = owners
        chosen = {experts[m][1] for g in part for m in g.members}
        return functools.partial(only_experts, layer.get_submodule(owner[len(prefix) :]), chosen)

    def _smooth(
        self,
        layer: nn.Module,
        groups: list[StatGroup],
        prefix: str,
        compute: torch.dtype,
        run_one: Callable[[], torch.Tensor],
    ) -> None:
        """Fold per-channel scales for every (producer, consumers) mapping whose consumers are all targets and
        whose fold leaves the layer unchanged (:func:`folds_preserve_output`, checked at the first layer that has
        the mapping, agreed over ranks; a rejected mapping is logged and skipped everywhere).

        The scale is searched on the first consumer's statistics (the consumers share their input); every
        consumer's statistics are rescaled after the fold.
        """
        by_member = {m: g for g in groups for m in g.members}
        names = dict(layer.named_modules())
        for k, (producer, consumers) in enumerate(smooth_mappings(self.model, layer)):
            affected = [by_member.get(prefix + c) for c in consumers]
            if any(g is None for g in affected) or not self._fold_preserves(layer, producer, consumers, run_one):
                continue
            weights = [names[c].weight.to(compute) for c in consumers]
            owner = self.comm.owner(k)
            s = torch.empty(weights[0].shape[1], dtype=torch.float32, device=weights[0].device)
            if self.comm.rank == owner:
                s = self.smoother.scales(weights, affected[0], self.scheme, self.cfg).float()
            self.comm.broadcast_(s, owner)
            touched = [names[producer], *(names[c] for c in consumers)]
            self.edits.will_write([t for m in touched for t in (m.weight, getattr(m, "bias", None)) if t is not None])
            _fold(names[producer], [names[c] for c in consumers], s)
            for group in {id(g): g for g in affected}.values():
                group.rescale(s)

    def _fold_preserves(
        self, layer: nn.Module, producer: str, consumers: list[str], run_one: Callable[[], torch.Tensor]
    ) -> bool:
        key = (producer, tuple(consumers))
        if key not in self._fold_checked:
            ok = folds_preserve_output(layer, producer, consumers, run_one)
            (agree,) = self.comm.sum(float(ok))
            self._fold_checked[key] = agree == self.comm.world
            if not self._fold_checked[key]:
                logger.info(
                    "tlq smoothing: %s -> %s skipped: a scale folded there would change the layer's output",
                    producer,
                    ", ".join(consumers),
                )
        return self._fold_checked[key]

    def _footprint(self, live: dict[str, nn.Module], samples: int) -> Callable[[StatGroup], int]:
        def footprint(group: StatGroup) -> int:
            width = live[group.members[0]].weight.shape[1]
            return sum(stat.footprint(width, samples) for stat in group.stats.values())

        return footprint

    def _solve(
        self,
        live: dict[str, nn.Module],
        groups: list[StatGroup],
        on: Onloaded,
        install: bool = True,
        phases: dict[str, float] | None = None,
    ) -> dict[str, nn.Module]:
        """Each group solved by its owner rank and broadcast. The packed modules are swapped in at once
        (``install``: the replaced linears' onloaded copies are released as soon as they are swapped out) or
        returned, to be installed (:meth:`_install`) once no statistics pass needs the full-precision ones.
        ``phases["experts_solve"]`` gains the seconds spent on expert projections."""
        dtype = on.store_dtype
        owners = self._owners([[live[n] for n in g.members] for g in groups])
        kept: dict[str, nn.Module] = {}
        for group, owner in zip(groups, owners):
            start = time.perf_counter()
            linears = [live[n] for n in group.members]
            solve = solve_rtn if group.fallback else self.solver.solve
            if self.comm.rank == owner:
                solutions = solve([m.weight.detach() for m in linears], group, self.scheme, self.cfg, dtype)
            else:
                solutions = [self._empty_solution(m, dtype) for m in linears]
            group.stats.clear()
            packed = {}
            for name, linear, (codes, qp) in zip(group.members, linears, solutions):
                for t in (codes, qp.scale, qp.zero):
                    self.comm.broadcast_(t, owner)
                packed[name] = TLQLinear.from_codes(codes, qp, self.scheme, bias=linear.bias)
            del solutions
            if install:
                self._install(packed, live, on)
            else:
                kept.update(packed)
            if phases is not None and expert_index(group.members[0], self.model) is not None:
                phases["experts_solve"] += time.perf_counter() - start
        return kept

    def _install(self, packed: dict[str, nn.Module], live: dict[str, nn.Module], on: Onloaded) -> None:
        """Swap the packed modules in and release the replaced linears' onloaded copies."""
        for name, module in packed.items():
            self.edits.swap(name, module)
            on.release(live[name])
        packed.clear()

    def _owners(self, groups: list[list[nn.Module]]) -> list[int]:
        """Owner rank of each group: largest solve first to the least-loaded rank (same on every rank).

        Cost model of a GPTQ-style solve: factorising ``in x in`` plus sweeping every member's columns.
        """
        costs = [
            float(ms[0].weight.shape[1]) ** 3 / 3 + sum(float(m.weight.numel()) * 128 for m in ms) for ms in groups
        ]
        load = [0.0] * self.comm.world
        owners = [0] * len(groups)
        for k in sorted(range(len(groups)), key=lambda k: (-costs[k], k)):
            owners[k] = min(range(self.comm.world), key=lambda r: (load[r], r))
            load[owners[k]] += costs[k]
        return owners

    def _empty_solution(self, linear: nn.Module, dtype: torch.dtype) -> Solution:
        out_f, in_f = linear.weight.shape
        n_groups = self.scheme.groups(in_f)
        device = linear.weight.device
        return (
            torch.empty(out_f, in_f, dtype=torch.int8, device=device),
            QParams(
                scale=torch.empty(out_f, n_groups, dtype=dtype, device=device),
                zero=torch.zeros(out_f, n_groups, dtype=torch.int8, device=device),
            ),
        )
