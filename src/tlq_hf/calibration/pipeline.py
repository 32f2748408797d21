"""The quantization pipeline: pick target linears, run the method's solver, swap in packed modules."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import select_quant_targets
from ..nn import TLQLinear
from ..primitives import dequantize_codes
from ..qtypes import QuantScheme
from ..solvers import rtn

__all__ = ["METHODS", "ModuleReport", "QuantizationReport", "quantize_model", "swap_module"]

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
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.modules:
            return f"{self.method} {self.scheme}: no module quantized"
        errs = [m.rel_weight_error for m in self.modules]
        return (
            f"{self.method} {self.scheme}: {len(self.modules)} linears in {self.seconds:.2f}s, "
            f"relative weight error mean {sum(errs) / len(errs):.4f} max {max(errs):.4f}"
        )


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` by ``new``, carrying over an accelerate hook if the old one had one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    hook = getattr(old, "_hf_hook", None)
    setattr(parent, child, new)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def _quantize_rtn(model: nn.Module, targets: dict[str, nn.Linear], scheme: QuantScheme) -> list[ModuleReport]:
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


# method name -> function(model, targets, scheme) -> per-module reports
METHODS: dict[str, Callable[[nn.Module, dict[str, nn.Linear], QuantScheme], list[ModuleReport]]] = {
    "rtn": _quantize_rtn,
}


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


@torch.no_grad()
def quantize_model(model: nn.Module, config) -> QuantizationReport:
    """Quantize ``model`` in place as ``config`` (a :class:`~tlq_hf.TLQConfig`) says; return the report."""
    scheme = config.scheme
    if config.method not in METHODS:
        raise ValueError(f"method {config.method!r} is not implemented; available: {sorted(METHODS)}")
    targets = select_quant_targets(model, config.ignore)
    _check_targets(targets, scheme)
    start = time.perf_counter()
    modules = METHODS[config.method](model, targets, scheme)
    report = QuantizationReport(config.method, scheme.name, modules, time.perf_counter() - start)
    logger.info("tlq_hf: %s", report.summary())
    return report
