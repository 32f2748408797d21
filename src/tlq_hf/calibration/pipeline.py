"""The quantization pipeline: one path for TLQ and every baseline, so a comparison is a config change.

``rtn`` needs no data: each target linear is rounded to nearest. Every other method:
capture layer-0 inputs -> (optional) block-wise gradient importance -> per-module token weights (tempered,
optionally a token subset) -> layer-wise calibration with the method's solver. Methods are recipes
(:data:`tlq_hf.methods.METHODS`); explicit config fields (``importance``, ``solver``, ``exposed``) override a recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack, find_decoder_stack, select_quant_targets
from ..coverage import Coverage, decoder_coverage
from ..experts import expert_owner, unfuse_experts
from ..formats import FORMATS
from ..hostmem import map_large_allocations
from ..methods import METHODS, Recipe, resolve_recipe
from ..nn import TLQLinear
from ..primitives import dequantize_codes
from ..qtypes import QuantScheme
from ..solvers import rtn
from .activations import spill_root
from .batching import assign_batches, plan_batches
from .capture import CapturedSample, capture_layer_inputs, module_device
from .distributed import Comm, init_from_env
from .importance import AnswerLoss, Tempering, TokenWeighting, gradient_importance
from .importance_kinds import IMPORTANCE_KINDS
from .io_clock import io_seconds
from .journal import ModelEdits
from .layer_loop import CalibrationData, LayerLoop, LayerReport, LayerSettings
from .offload import calibration_precision, compute_dtype_for, offload_unfused_experts, onloaded
from .resume import LayerCheckpoint, fingerprint

__all__ = ["ModuleReport", "QuantizationReport", "quantize_model"]

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    """What happened to one linear: relative Frobenius weight error and solver time."""

    name: str
    rel_weight_error: float
    seconds: float


@dataclass
class QuantizationReport:
    """Summary of one quantization run (kept on the model as ``model.tlq_report``)."""

    method: str
    scheme: str
    modules: list[ModuleReport] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    answer_loss: float | None = None
    seconds: float = 0.0
    recipe: Recipe | None = None
    samples: int = 0
    tokens: int = 0
    vision_tokens: int = 0  # of ``tokens``: image tokens
    answer_tokens: int = 0  # of ``tokens``: answer tokens (the ones the importance loss is taken on)
    io_seconds: float = 0.0  # of ``seconds``: reading/writing spilled activations and loading offloaded layers
    coverage: Coverage | None = None  # decoder weights quantized / kept in full precision, and why
    compute_dtype: str | None = None  # what the decoder layers computed in while calibrating (e.g. "bfloat16")

    def summary(self, timing: bool = True) -> str:
        """One line: what was quantized, errors, data; with ``timing``, the seconds per phase (the only part of
        the report that differs between two identical runs)."""
        parts = [f"{self.method} {self.scheme}"]
        if self.modules:
            errs = [m.rel_weight_error for m in self.modules]
            parts.append(f"{len(self.modules)} linears rounded, weight rel. error mean {sum(errs) / len(errs):.4f}")
        if self.layers:
            parts.append(
                f"{len(self.layers)} layers, weighted output rel. error (last layer) "
                f"{self.layers[-1].error_before:.2e} -> {self.layers[-1].error_after:.2e}"
            )
        if self.coverage is not None:
            parts.append(self.coverage.summary())
        fallbacks = sum(len(r.fallbacks) for r in self.layers)
        if fallbacks:
            parts.append(f"{fallbacks} expert projections rounded to nearest (too few tokens)")
        if self.samples:
            parts.append(f"{self.samples} samples / {self.tokens} tokens")
        if self.compute_dtype is not None:
            parts.append(f"layers computed in {self.compute_dtype}")
        if self.answer_loss is not None:
            parts.append(f"FP answer loss {self.answer_loss:.3f}")
        if timing:
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
            if self.io_seconds:
                phases += f"; of all: I/O {self.io_seconds:.1f}s"
            parts.append(f"{self.seconds:.1f}s" + (f" ({phases})" if phases else ""))
        return "; ".join(parts)

    def as_dict(self) -> dict:
        """Everything in the report as JSON-ready values (``summary`` included)."""
        out = dataclasses.asdict(self)
        out["recipe"] = dataclasses.asdict(self.recipe) if self.recipe is not None else None
        out["summary"] = self.summary()
        return out

    def table(self) -> str:
        """Per-layer weighted relative output error before / after quantizing the layer."""
        lines = ["layer  error_before  error_after  seconds"]
        lines += [f"{r.index:5d}  {r.error_before:12.3e}  {r.error_after:11.3e}  {r.seconds:7.2f}" for r in self.layers]
        return "\n".join(lines)


def _round_to_nearest(
    model: nn.Module, targets: dict[str, nn.Linear], scheme: QuantScheme, edits: ModelEdits
) -> list[ModuleReport]:
    """Round each target to nearest, onloading one parent module (an attention block, an MLP, all experts of an MoE
    layer) at a time in its stored dtype (each weight is upcast alone)."""
    by_parent: dict[str, list[str]] = {}
    for name in targets:
        by_parent.setdefault(expert_owner(name, model) or name.rpartition(".")[0], []).append(name)
    reports = []
    bar = tqdm(total=len(targets), desc="tlq rtn", unit="linear", leave=False)
    for parent, names in by_parent.items():
        edits.will_rehome(model.get_submodule(parent))
        with torch.no_grad(), onloaded(model.get_submodule(parent), keep=True, upcast=False) as on:
            for name in names:
                start = time.perf_counter()
                linear = targets[name]
                weight = linear.weight.detach().to(on.compute_dtype)
                codes, qparams = rtn(weight, scheme, scale_dtype=on.store_dtype)
                deq = dequantize_codes(codes, qparams, scheme, dtype=torch.float32)
                err = float((deq - weight.float()).norm() / weight.float().norm().clamp_min(1e-12))
                packed = TLQLinear.from_codes(codes, qparams, scheme, bias=linear.bias, dtype=on.store_dtype)
                edits.swap(name, packed)
                reports.append(ModuleReport(name, err, time.perf_counter() - start))
                bar.update(1)
    bar.close()
    return reports


def _check_targets(model: nn.Module, targets: dict[str, nn.Linear], scheme: QuantScheme) -> None:
    if not targets:
        raise ValueError("No linear layer selected for quantization: check TLQConfig(ignore=...).")
    for name, linear in targets.items():
        scheme.check_in_features(linear.in_features, name)
    if not scheme.calibrated_activations:
        return
    stack = find_decoder_stack(model).path + "."
    outside = [n for n in targets if not n.startswith(stack)]
    if outside:
        raise ValueError(
            f"{scheme.name} calibrates each layer's activation range on the decoder's calibration inputs; "
            f"{len(outside)} selected linears lie outside the decoder (e.g. {outside[0]!r}) where tlq_hf has no "
            "calibration pass. Keep them in full precision (TLQConfig(ignore=None) does), or use activations "
            "without a global scale (e.g. scheme='FP8_DYNAMIC')."
        )


IN_MEMORY_BOUNDARIES = 1 << 30


def _keep_boundaries(captured: list, n_layers: int, spill: str | None) -> bool:
    """Keep the gradient pass's full-precision boundaries as the layer loop's targets (one forward per layer
    less) when they are spilled to disk, or when all ``L + 1`` of them fit in :data:`IN_MEMORY_BOUNDARIES`."""
    if spill is not None:
        return True
    per_boundary = sum(c.hidden.numel() * c.hidden.element_size() for c in captured)
    return (n_layers + 1) * per_boundary <= IN_MEMORY_BOUNDARIES


def _load_samples(model: nn.Module, config):
    from ..data import build_calibration_set, check_processor

    if config.dataset is None:
        rows = "(rows with an image and a question/answer, messages or a caption)"
        if not METHODS[config.method].needs_data:  # the activations' ranges need data, even to round to nearest
            raise ValueError(
                f"{config.scheme.name} calibrates each layer's activation range on data, also with "
                f"method={config.method!r}: pass TLQConfig(dataset=...) {rows}, or pick weight-only or dynamic "
                "activations (e.g. scheme='NVFP4A16' or 'FP8_DYNAMIC')."
            )
        raise ValueError(
            f"TLQConfig(method={config.method!r}) calibrates on data: pass TLQConfig(dataset=...) {rows}, "
            "or use method='rtn'."
        )
    processor = config.processor
    if processor is None:
        from transformers import AutoProcessor

        source = getattr(model.config, "_name_or_path", None)
        if not source:
            raise ValueError("No processor to encode the calibration data: pass TLQConfig(processor=...).")
        processor = AutoProcessor.from_pretrained(source)
    check_processor(model.config, processor)
    samples = build_calibration_set(config.dataset, processor, config.num_samples, config.max_length, config.seed)
    check_processor(model.config, processor, samples)
    return samples


@torch.no_grad()
def quantize_model(model: nn.Module, config, undo: bool = False) -> QuantizationReport:
    """Quantize ``model`` in place as ``config`` (a :class:`~tlq_hf.TLQConfig`) says; return the report.

    Everything checkable up front (targets against the scheme, the decoder stack, every calibration row) is
    checked before the first forward pass. ``undo``: if the run fails or is interrupted (``KeyboardInterrupt``),
    put the model back as it was (:class:`~tlq_hf.calibration.journal.ModelEdits`) before re-raising.
    """
    scheme, recipe = config.scheme, resolve_recipe(config)
    edits = ModelEdits(model, undo)
    FORMATS[config.save_format].check_model(model, config)  # a checkpoint that would not reload: refused now
    try:
        # fused MoE experts as per-expert linears (same function); offloaded ones read one expert at a time
        unfuse_experts(model, "", edits.swap, offloaded=offload_unfused_experts)
        targets = select_quant_targets(model, config.ignore)
        _check_targets(model, targets, scheme)
        coverage = decoder_coverage(model, targets, config.ignore)  # nothing left float without a rule
        report = _calibrate(model, config, scheme, recipe, targets, edits)
        report.coverage = coverage
        logger.info("tlq_hf: %s", coverage.summary())
        for name, reason in coverage.kept_modules.items():
            logger.debug("tlq_hf: kept in full precision: %s (%s)", name, reason)
        return report
    except BaseException:
        if undo:
            edits.rollback()
        raise


def _calibrate(model: nn.Module, config, scheme: QuantScheme, recipe: Recipe, targets: dict, edits: ModelEdits):
    """The run: round to nearest (no data), or capture -> gradient importance (if the recipe weighs tokens by
    gradients) -> the layer loop, checkpointed per layer when ``checkpoint_dir`` is set."""
    start, io_start = time.perf_counter(), io_seconds()
    report = QuantizationReport(config.method, scheme.name, recipe=recipe)
    if not config.needs_data:
        report.modules = _round_to_nearest(model, targets, scheme, edits)
        report.seconds = time.perf_counter() - start
        logger.info("tlq_hf: %s", report.summary())
        return report
    with calibration_precision(config.calibration_dtype):
        _calibrate_with_data(model, config, scheme, recipe, targets, edits, report)
    report.seconds = time.perf_counter() - start
    report.io_seconds = io_seconds() - io_start
    logger.info("tlq_hf: %s\n%s", report.summary(), report.table())
    return report


def _calibrate_with_data(
    model: nn.Module, config, scheme: QuantScheme, recipe: Recipe, targets: dict, edits: ModelEdits, report
) -> None:
    """Capture, the gradient pass where the recipe needs it, the layer loop (see :func:`_calibrate`)."""
    run = _Run(model, config, scheme, recipe, edits, report)
    run.capture(targets)
    first = run.stack.layers[0]
    stored = next((p.dtype for p in first.parameters() if p.is_floating_point()), torch.float32)
    report.compute_dtype = str(compute_dtype_for(module_device(first), stored)).removeprefix("torch.")
    run.spill = spill_root(config.offload_dir)
    try:
        if config.checkpoint_dir is not None:
            settings = {**config.to_dict(), "compute_dtype": report.compute_dtype}  # "auto" as resolved here
            digest = fingerprint(settings, model, run.stack, run.captured)
            run.checkpoint = LayerCheckpoint(config.checkpoint_dir, digest, run.comm)
            run.done = run.checkpoint.open()
        weighting = None
        if recipe.importance is not None and IMPORTANCE_KINDS[recipe.importance].from_gradient:
            weighting = run.importance()
        report.layers = run.layers(weighting)
    finally:
        if run.spill is not None:
            shutil.rmtree(run.spill, ignore_errors=True)


@dataclass
class _Run:
    """One data-driven calibration run: what it was given, then what each step leaves for the next (capture:
    the decoder stack and its targets, every encoded row, this rank's share in gradient-pass batches and their
    decoder inputs; the activation folder; the per-layer checkpoint and how many layers it holds)."""

    model: nn.Module
    config: object
    scheme: QuantScheme
    recipe: Recipe
    edits: ModelEdits
    report: QuantizationReport
    stack: DecoderStack | None = None
    in_stack: dict[str, nn.Module] = field(default_factory=dict)
    samples: list = field(default_factory=list)
    shard: list[int] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    captured: list[CapturedSample] = field(default_factory=list)
    comm: Comm | None = None
    spill: str | None = None
    checkpoint: LayerCheckpoint | None = None
    done: int = 0

    def capture(self, targets: dict[str, nn.Module]) -> None:
        """Encode every row (or refuse, before any weight changes), round linears outside the decoder, plan the
        gradient pass's batches, shard them over ranks and capture this rank's decoder inputs."""
        model, report = self.model, self.report
        self.stack = find_decoder_stack(model)
        self.in_stack = {n: m for n, m in targets.items() if n.startswith(self.stack.path + ".")}
        outside = {n: m for n, m in targets.items() if n not in self.in_stack}
        init_from_env()
        map_large_allocations()
        self.comm = comm = Comm.current()
        t0 = time.perf_counter()
        self.samples = _load_samples(model, self.config)  # every row encoded (or refused) before any weight changes
        if outside:  # e.g. a vision tower the user chose to quantize: no decoder-layer objective there
            logger.info("tlq_hf: %d linears outside the decoder stack are rounded to nearest", len(outside))
            report.modules = _round_to_nearest(model, outside, self.scheme, self.edits)
        # batches of equal-length samples for the gradient pass, planned over all samples; ranks take whole batches
        plan = plan_batches([s.num_tokens for s in self.samples], model.get_input_embeddings().embedding_dim)
        self.shard, self.batches = assign_batches(plan, comm.world, comm.rank)
        logger.info("tlq_hf: capture: decoder inputs of %d samples", len(self.shard))
        self.captured = captured = capture_layer_inputs(model, self.stack, [self.samples[i] for i in self.shard])
        report.samples = len(self.samples)
        counts = comm.sum(
            sum(c.hidden.shape[1] for c in captured),
            sum(int(c.vision_mask.sum()) for c in captured),
            sum(int(c.answer_mask.sum()) for c in captured),
        )
        report.tokens, report.vision_tokens, report.answer_tokens = (int(t) for t in counts)
        report.phases["capture"] = time.perf_counter() - t0

    def importance(self) -> TokenWeighting:
        """The gradient pass (or its checkpointed result) and the token weights it gives."""
        t0 = time.perf_counter()
        config, kind, captured, stack = self.config, self.recipe.importance, self.captured, self.stack
        logger.info("tlq_hf: importance: %s token importance over %d layers", kind, len(stack.layers))
        if self.checkpoint is not None and self.checkpoint.has_importance():
            grad = self.checkpoint.load_importance(len(captured))
        else:
            keep = _keep_boundaries(captured, len(stack.layers), self.spill)
            spec = AnswerLoss(config.importance_labels, config.importance_topk, config.answer_tokens)
            grad = gradient_importance(
                self.model, stack, captured, self.in_stack, kind, self.spill, self.comm, keep, spec, self.batches
            )
            if self.checkpoint is not None:
                self.checkpoint.save_importance(grad)
        lo, hi = config.importance_clip
        weighting = TokenWeighting(
            grad,
            kind,
            Tempering(config.gamma, lo, hi, config.uniform_mix),
            config.token_fraction,
            [s.vision_mask for s in captured],
            self.shard,
            self.comm,
            scope=config.importance_scope,
            layer_of=stack.layer_index,
        )
        self.report.answer_loss = grad.loss
        self.report.phases["importance"] = time.perf_counter() - t0
        return weighting

    def layers(self, weighting: TokenWeighting | None) -> list[LayerReport]:
        """The layer loop from layer 0 (or from the checkpoint's next layer), committing a checkpoint after each."""
        t0 = time.perf_counter()
        config, recipe, stack, checkpoint = self.config, self.recipe, self.stack, self.checkpoint
        logger.info("tlq_hf: layers: %s calibration of %d decoder layers", recipe.solver, len(stack.layers))
        settings = LayerSettings(
            solver=recipe.solver,
            smoothing=recipe.smoothing,
            exposed=recipe.exposed,
            damp=config.damp,
            act_order=config.act_order,
            smooth_alpha=config.smooth_alpha,
            expert_min_tokens=config.expert_min_tokens,
            expert_all_tokens=config.expert_all_tokens,
        )
        data = CalibrationData(
            self.captured,
            samples=self.shard,
            total_samples=len(self.samples),
            comm=self.comm,
            spill_dir=self.spill,
            fp_boundaries=None if self.done or weighting is None else weighting.grad.boundaries,
        )
        loop = LayerLoop(self.model, stack, self.in_stack, data, self.scheme, settings, weighting, self.edits)
        if self.done:
            state = checkpoint.restore(self.model, stack, self.scheme, self.done, self.spill, self.edits)
        else:
            state = loop.initial_state()
        on_done = None
        if checkpoint is not None:
            on_done = lambda st: checkpoint.commit(st, stack.layers[st.layer - 1])  # noqa: E731
        layers = loop.run(state, on_done)
        state.close()
        self.report.phases["layers"] = time.perf_counter() - t0
        return layers
