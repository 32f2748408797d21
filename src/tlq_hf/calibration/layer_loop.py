"""Quantization-exposed layer-wise calibration.

For ``l = 0..L-1``: layer ``l`` sees ``X_in`` = what the already-quantized layers ``0..l-1`` produce
(``exposed=True``) or the full-precision boundary ``X_fp[l]`` (``exposed=False``). One pass of the
still-full-precision layer on ``X_in`` collects, per target linear, the importance-weighted statistics
its solver needs (a weighted Hessian for GPTQ; subsampled inputs for AWQ / SmoothQuant). The solver's
codes replace the linears by packed modules, and the quantized layer's output on ``X_in`` becomes the
next layer's input. The report gives, per layer, the importance-weighted relative error of the layer
output against the full-precision target ``X_fp[l+1]``: ``before`` (full-precision layer on ``X_in``: the
error carried in) and ``after`` (quantized layer on ``X_in``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack, smooth_mappings
from ..nn import TLQLinear, dequant_cache
from ..primitives import fake_quantize_activation, quantize_codes
from ..qtypes import QuantScheme
from ..solvers import awq_clip_search, awq_scale_search, gptq, rtn, smoothquant_scales
from .capture import CapturedSample, layer_forward, module_device, to_device

__all__ = ["LayerSettings", "LayerReport", "calibrate_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSettings:
    """How each layer is calibrated (a method's recipe resolved against the config)."""

    solver: str = "gptq"  # "rtn" | "gptq" | "awq"
    smoothing: str | None = None  # None | "awq" | "smoothquant"
    exposed: bool = True
    damp: float = 0.01
    act_order: bool = True
    smooth_alpha: float = 0.5
    awq_grid: int = 20
    max_tokens: int = 4096  # per module, for the input-keeping solvers


@dataclass
class LayerReport:
    index: int
    error_before: float
    error_after: float
    seconds: float


class _Stats:
    """Per-module input statistics collected by forward pre-hooks during one layer pass.

    Hessian rows are buffered and multiplied in large float32 blocks (``flush_elements`` input values at
    a time, accumulated in float64), instead of one small product per sample and module.
    """

    flush_elements = 1 << 24  # 64 MiB of float32 inputs per module before a flush

    def __init__(
        self, modules: dict[str, nn.Linear], act_bits: int | None, keep_inputs: bool, gram: bool, keep_per_sample: int
    ):
        self.act_bits, self.keep_inputs, self.gram = act_bits, keep_inputs, gram
        self.keep_per_sample = keep_per_sample  # input rows kept per sample (memory stays bounded)
        self.weights: dict[str, torch.Tensor | None] = {}
        self.hessian: dict[str, torch.Tensor] = {}
        self.mass: dict[str, float] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.token_w: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.absmax: dict[str, torch.Tensor] = {}
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in modules}
        self._pending_elements: dict[str, int] = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            if self.act_bits is not None:
                x = fake_quantize_activation(x, self.act_bits)
            x = x.reshape(-1, x.shape[-1]).float()
            a = self.weights.get(name)
            a = torch.ones(x.shape[0], device=x.device) if a is None else a.to(x.device).float()
            keep = a > 0
            amax = x.abs().amax(0)
            self.absmax[name] = amax if name not in self.absmax else torch.maximum(self.absmax[name], amax)
            if self.gram:
                self._pending[name].append((x[keep], a[keep]))
                self._pending_elements[name] += x.numel()
                if self._pending_elements[name] >= self.flush_elements:
                    self._flush(name)
            if self.keep_inputs:
                xs, ws = _subsample_rows(x[keep], a[keep], self.keep_per_sample)
                self.inputs[name].append(xs.cpu())
                self.token_w[name].append(ws.cpu())

        return hook

    def _flush(self, name: str) -> None:
        if not self._pending[name]:
            return
        x = torch.cat([p[0] for p in self._pending[name]])
        a = torch.cat([p[1] for p in self._pending[name]])
        h = ((x * a[:, None]).T @ x).double()
        self.hessian[name] = h if name not in self.hessian else self.hessian[name] + h
        self.mass[name] = self.mass.get(name, 0.0) + float(a.double().sum())
        self._pending[name], self._pending_elements[name] = [], 0

    def normalized_hessian(self, name: str) -> torch.Tensor:
        """``sum_t a_t x_t x_t^T / sum_t a_t`` over every token the module saw (float32)."""
        self._flush(name)
        return (self.hessian[name] / max(self.mass[name], 1e-12)).float()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _weighted_rel_error(
    outs: list[torch.Tensor], refs: list[torch.Tensor], weights: list[torch.Tensor] | None
) -> float:
    num = den = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        a = torch.ones(r.shape[1]) if weights is None else weights[i].float()
        num += float((a * (o.float() - r.float()).pow(2).sum(-1)[0].cpu()).sum())
        den += float((a * r.float().pow(2).sum(-1)[0].cpu()).sum())
    return num / max(den, 1e-30)


def _fold(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """``producer`` output / s, consumers' input columns * s: the layer function is unchanged."""
    with torch.no_grad():
        w = producer.weight
        if w.ndim == 2:
            w.div_(s.to(w.dtype)[:, None])
        else:
            w.div_(s.to(w.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        for c in consumers:
            c.weight.mul_(s.to(c.weight.dtype)[None, :])


def _subsample_rows(x: torch.Tensor, a: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] <= max_tokens:
        return x, a
    idx = torch.linspace(0, x.shape[0] - 1, max_tokens).round().long()
    return x[idx], a[idx]


def _smooth(layer: nn.Module, model: nn.Module, stats: _Stats, prefix: str, scheme: QuantScheme, cfg: LayerSettings):
    """Fold per-channel scales for every (producer, consumers) mapping of the layer."""
    names = dict(layer.named_modules())
    for producer, consumers in smooth_mappings(model, layer):
        keys = [f"{prefix}.{c}" for c in consumers]
        if not all(k in stats.absmax for k in keys):
            continue
        weights = [names[c].weight for c in consumers]
        if cfg.smoothing == "smoothquant":
            s = smoothquant_scales(stats.absmax[keys[0]], weights, cfg.smooth_alpha)
        else:
            x, a = _subsample_rows(torch.cat(stats.inputs[keys[0]]), torch.cat(stats.token_w[keys[0]]), cfg.max_tokens)
            s, _, _ = awq_scale_search(weights, x, a, scheme, grid=cfg.awq_grid, scale_dtype=weights[0].dtype)
        _fold(names[producer], [names[c] for c in consumers], s)
        for k in keys:
            stats.inputs[k] = [x / s for x in stats.inputs[k]]
            stats.absmax[k] = stats.absmax[k] / s


def _solve(name: str, linear: nn.Linear, stats: _Stats, scheme: QuantScheme, cfg: LayerSettings):
    w, dtype = linear.weight.detach(), linear.weight.dtype
    if cfg.solver == "gptq":
        return gptq(
            w, stats.normalized_hessian(name), scheme, damp=cfg.damp, act_order=cfg.act_order, scale_dtype=dtype
        )
    if cfg.solver == "awq":
        x, a = _subsample_rows(torch.cat(stats.inputs[name]), torch.cat(stats.token_w[name]), cfg.max_tokens)
        qp = awq_clip_search(w, x, a, scheme, scale_dtype=dtype)
        return quantize_codes(w, qp, scheme), qp
    return rtn(w, scheme, scale_dtype=dtype)


def calibrate_layers(
    model: nn.Module,
    stack: DecoderStack,
    targets: dict[str, nn.Linear],
    captured: list[CapturedSample],
    scheme: QuantScheme,
    cfg: LayerSettings,
    module_weights: dict[str, list[torch.Tensor]] | None,
    layer_weights: list[list[torch.Tensor]] | None,
    fp_boundaries: list[list[torch.Tensor]] | None,
    swap: Callable[[str, nn.Module], None],
    offload: str = "cpu",
) -> list[LayerReport]:
    """Quantize the decoder layer by layer; ``swap(name, module)`` installs each packed linear."""
    x_fp = [s.hidden for s in captured]
    x_in = x_fp
    reports = []
    for i, layer in enumerate(tqdm(stack.layers, desc=f"tlq layers ({cfg.solver})", unit="layer")):
        start = time.perf_counter()
        device = module_device(layer)
        prefix = stack.layer_prefix(i)
        layer_targets = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
        kwargs = [to_device(s.kwargs, device) for s in captured]
        with torch.no_grad():
            if fp_boundaries is not None:
                y_fp = fp_boundaries[i + 1]
            else:
                y_fp = [layer_forward(layer, h.to(device), kw).to(offload) for h, kw in zip(x_fp, kwargs)]
            if not cfg.exposed:
                x_in = x_fp
            stats = _Stats(
                layer_targets,
                scheme.act_bits,
                keep_inputs=cfg.solver == "awq" or cfg.smoothing == "awq",
                gram=cfg.solver == "gptq",
                keep_per_sample=max(1, -(-cfg.max_tokens // len(captured))),
            )
            y_before = []
            try:
                for j, (h, kw) in enumerate(zip(x_in, kwargs)):
                    stats.weights = {n: (module_weights[n][j] if module_weights else None) for n in layer_targets}
                    y_before.append(layer_forward(layer, h.to(device), kw).to(offload))
            finally:
                stats.remove()
            if cfg.smoothing is not None:
                _smooth(layer, model, stats, prefix, scheme, cfg)
            for name, linear in layer_targets.items():
                codes, qp = _solve(name, linear, stats, scheme, cfg)
                swap(name, TLQLinear.from_codes(codes, qp, scheme, bias=linear.bias))
            del stats
            with dequant_cache(layer):
                y_after = [layer_forward(layer, h.to(device), kw).to(offload) for h, kw in zip(x_in, kwargs)]
        lw = layer_weights[i] if layer_weights is not None else None
        report = LayerReport(
            i,
            _weighted_rel_error(y_before, y_fp, lw),
            _weighted_rel_error(y_after, y_fp, lw),
            time.perf_counter() - start,
        )
        logger.info("tlq layer %d: weighted rel. error %.3e -> %.3e", i, report.error_before, report.error_after)
        reports.append(report)
        x_fp, x_in = y_fp, y_after
    return reports
