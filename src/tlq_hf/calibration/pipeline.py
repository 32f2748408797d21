"""The quantization pipeline: one path for TLQ and every baseline, so a comparison is a config change.

``rtn`` needs no data: each target linear is rounded to nearest. Every other method:
capture layer-0 inputs -> (optional) block-wise gradient importance -> per-module token weights (tempered,
optionally a token subset) -> layer-wise calibration with the method's solver. Methods are recipes
(:data:`RECIPES`); explicit config fields (``importance``, ``solver``, ``exposed``) override a recipe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import find_decoder_stack, select_quant_targets, swap_module
from ..nn import TLQLinear
from ..primitives import dequantize_codes
from ..qtypes import QuantScheme
from ..solvers import rtn
from .capture import capture_layer_inputs
from .importance import Tempering, gradient_importance, modality_balance, select_tokens, temper
from .layer_loop import LayerReport, LayerSettings, calibrate_layers

__all__ = ["RECIPES", "Recipe", "ModuleReport", "QuantizationReport", "quantize_model", "resolve_recipe"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """What a method turns on: token importance, solver, smoothing, exposed inputs."""

    importance: str | None  # None: no token weights at all
    solver: str
    smoothing: str | None
    exposed: bool


RECIPES: dict[str, Recipe] = {
    "tlq": Recipe("fisher", "gptq", None, True),
    "gptq": Recipe("uniform", "gptq", None, True),  # as GPTQ tools do: sequential, quantized inputs
    "awq": Recipe("uniform", "awq", "awq", False),
    "mbq": Recipe("modality", "awq", "awq", False),
    "smoothquant": Recipe(None, "rtn", "smoothquant", False),
    "rtn": Recipe(None, "rtn", None, False),
}


def resolve_recipe(config) -> Recipe:
    """The method's recipe with the config's explicit overrides applied."""
    base = RECIPES[config.method]
    solver = config.solver or base.solver
    smoothing = base.smoothing
    if config.method == "tlq":
        smoothing = "awq" if solver == "awq" else None
    importance = config.importance if config.importance is not None else base.importance
    exposed = base.exposed if config.exposed is None else config.exposed
    return Recipe(importance, solver, smoothing, exposed)


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

    def summary(self) -> str:
        parts = [f"{self.method} {self.scheme}"]
        if self.modules:
            errs = [m.rel_weight_error for m in self.modules]
            parts.append(f"{len(self.modules)} linears rounded, weight rel. error mean {sum(errs) / len(errs):.4f}")
        if self.layers:
            parts.append(
                f"{len(self.layers)} layers, weighted output rel. error (last layer) "
                f"{self.layers[-1].error_before:.2e} -> {self.layers[-1].error_after:.2e}"
            )
        if self.samples:
            parts.append(f"{self.samples} samples / {self.tokens} tokens")
        if self.answer_loss is not None:
            parts.append(f"FP answer loss {self.answer_loss:.3f}")
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
        parts.append(f"{self.seconds:.1f}s" + (f" ({phases})" if phases else ""))
        return "; ".join(parts)

    def table(self) -> str:
        """Per-layer weighted relative output error before / after quantizing the layer."""
        lines = ["layer  error_before  error_after  seconds"]
        lines += [f"{r.index:5d}  {r.error_before:12.3e}  {r.error_after:11.3e}  {r.seconds:7.2f}" for r in self.layers]
        return "\n".join(lines)


def _round_to_nearest(model: nn.Module, targets: dict[str, nn.Linear], scheme: QuantScheme) -> list[ModuleReport]:
    reports = []
    for name, linear in tqdm(targets.items(), desc="tlq rtn", unit="linear", leave=False):
        start = time.perf_counter()
        weight = linear.weight.detach()
        codes, qparams = rtn(weight, scheme, scale_dtype=weight.dtype)
        deq = dequantize_codes(codes, qparams, scheme, dtype=torch.float32)
        err = float((deq - weight.float()).norm() / weight.float().norm().clamp_min(1e-12))
        swap_module(model, name, TLQLinear.from_codes(codes, qparams, scheme, bias=linear.bias))
        reports.append(ModuleReport(name, err, time.perf_counter() - start))
    return reports


def _check_targets(targets: dict[str, nn.Linear], scheme: QuantScheme) -> None:
    if not targets:
        raise ValueError("No linear layer selected for quantization: check TLQConfig(ignore=...).")
    for name, linear in targets.items():
        scheme.check_in_features(linear.in_features, name)
        if linear.weight.device.type == "meta":
            raise ValueError(
                f"{name} has its weight offloaded (on 'meta'): quantize-on-load needs the decoder weights in "
                "memory. Give the CPU enough room in `max_memory` (or load without disk offload), then save."
            )


def _token_weights(config, recipe: Recipe, raw, vision_masks) -> list[torch.Tensor]:
    lo, hi = config.importance_clip
    if recipe.importance == "modality":  # the per-modality ratio itself: normalised and clipped, not tempered
        weights = [temper(a, Tempering(1.0, lo, hi, 0.0)) for a in modality_balance(raw, vision_masks)]
    else:
        weights = [temper(a, Tempering(config.gamma, lo, hi, config.uniform_mix)) for a in raw]
    return select_tokens(weights, config.token_fraction)


def _load_samples(model: nn.Module, config):
    from ..data import build_calibration_set

    if config.dataset is None:
        raise ValueError(
            f"TLQConfig(method={config.method!r}) calibrates on data: pass TLQConfig(dataset=...) "
            "(rows with an image and a question/answer, messages or a caption), or use method='rtn'."
        )
    processor = config.processor
    if processor is None:
        from transformers import AutoProcessor

        source = getattr(model.config, "_name_or_path", None)
        if not source:
            raise ValueError("No processor to encode the calibration data: pass TLQConfig(processor=...).")
        processor = AutoProcessor.from_pretrained(source)
    return build_calibration_set(config.dataset, processor, config.num_samples, config.max_length, config.seed)


@torch.no_grad()
def quantize_model(model: nn.Module, config) -> QuantizationReport:
    """Quantize ``model`` in place as ``config`` (a :class:`~tlq_hf.TLQConfig`) says; return the report."""
    scheme, recipe = config.scheme, resolve_recipe(config)
    targets = select_quant_targets(model, config.ignore)
    _check_targets(targets, scheme)
    start = time.perf_counter()
    report = QuantizationReport(config.method, scheme.name, recipe=recipe)
    if recipe.solver == "rtn" and recipe.smoothing is None:
        report.modules = _round_to_nearest(model, targets, scheme)
        report.seconds = time.perf_counter() - start
        logger.info("tlq_hf: %s", report.summary())
        return report

    stack = find_decoder_stack(model)
    in_stack = {n: m for n, m in targets.items() if n.startswith(stack.path + ".")}
    outside = {n: m for n, m in targets.items() if n not in in_stack}
    if outside:  # e.g. a vision tower the user chose to quantize: no decoder-layer objective there
        logger.info("tlq_hf: %d linears outside the decoder stack are rounded to nearest", len(outside))
        report.modules = _round_to_nearest(model, outside, scheme)

    t0 = time.perf_counter()
    samples = _load_samples(model, config)
    captured = capture_layer_inputs(model, stack, samples)
    report.samples, report.tokens = len(captured), sum(c.hidden.shape[1] for c in captured)
    report.phases["capture"] = time.perf_counter() - t0

    module_weights = layer_weights = boundaries = None
    if recipe.importance is not None and recipe.importance != "uniform":
        t0 = time.perf_counter()
        vision = [s.vision_mask for s in captured]
        grad = gradient_importance(model, stack, captured, in_stack, kind=recipe.importance)
        module_weights = {n: _token_weights(config, recipe, raw, vision) for n, raw in grad.raw.items()}
        layer_weights = [_token_weights(config, recipe, raw, vision) for raw in grad.layer_raw]
        boundaries, report.answer_loss = grad.boundaries, grad.loss
        report.phases["importance"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings = LayerSettings(
        solver=recipe.solver,
        smoothing=recipe.smoothing,
        exposed=recipe.exposed,
        damp=config.damp,
        act_order=config.act_order,
        smooth_alpha=config.smooth_alpha,
    )
    report.layers = calibrate_layers(
        model,
        stack,
        in_stack,
        captured,
        scheme,
        settings,
        module_weights,
        layer_weights,
        boundaries,
        swap=lambda name, new: swap_module(model, name, new),
    )
    report.phases["layers"] = time.perf_counter() - t0
    report.seconds = time.perf_counter() - start
    logger.info("tlq_hf: %s\n%s", report.summary(), report.table())
    return report
