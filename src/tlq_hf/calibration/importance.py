"""Gradient token importance, computed block-wise.

The loss is the answer-token cross-entropy of the full-precision model. A no-grad forward stores the
boundary activations ``X[0..L]`` (on the offload device); the head (final norm + ``lm_head``) gives
``g[L] = dLoss/dX[L]``; then, from the last layer down, one layer at a time is re-run with grad from
``X[l]`` and back-propagated with ``g[l+1]``, so only one layer's graph is ever alive. Hooks keep the
gradient at every target linear's output: token ``t``'s raw importance for module ``m`` is
``sum_j g[t, j]^2`` (``"fisher"``, a diagonal-Fisher estimate of how much an output error at ``t`` raises
the loss) or ``sum_j |g[t, j]|`` (``"l1"``).

Raw importance is then normalised per sample and tempered, ``a <- clip((a / mean a)^gamma, lo, hi)``,
optionally mixed with uniform weights: raw squared gradients are so peaky that a Hessian weighted by them
is effectively estimated on a handful of tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack, find_final_norm
from .capture import CapturedSample, layer_forward, module_device, to_device

__all__ = [
    "IMPORTANCE_KINDS",
    "Tempering",
    "GradientPass",
    "gradient_importance",
    "reference_importance",
    "answer_loss",
    "temper",
    "modality_balance",
    "select_tokens",
]

logger = logging.getLogger(__name__)

IMPORTANCE_KINDS = ("fisher", "l1", "uniform", "modality")

_REDUCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fisher": lambda g: g.float().pow(2).sum(-1),
    "l1": lambda g: g.float().abs().sum(-1),
    "modality": lambda g: g.float().pow(2).sum(-1),  # per-token Fisher, averaged per modality later
}


@dataclass(frozen=True)
class Tempering:
    """``a <- (1 - mix) * clip((a / mean a)^gamma, lo, hi) + mix``, per sample."""

    gamma: float = 0.5
    lo: float = 0.05
    hi: float = 20.0
    mix: float = 0.0


@dataclass
class GradientPass:
    """What the block-wise pass returns."""

    raw: dict[str, list[torch.Tensor]]  # module name -> per-sample raw importance [T]
    boundaries: list[list[torch.Tensor]]  # X[l] for l = 0..L, per sample [1, T, H] (offload device)
    layer_raw: list[list[torch.Tensor]]  # per layer, per sample raw importance [T] at the layer's output
    loss: float
    seconds: float = 0.0


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (next-token prediction, labels shifted by one)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


class _OutputGrabber:
    """Forward hooks that keep each named module's output in the graph with ``retain_grad``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            output.retain_grad()
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _NoParamGrad:
    """Temporarily stop parameters from accumulating ``.grad`` (only activations need gradients)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _layer_targets(stack: DecoderStack, targets: dict[str, nn.Module], index: int) -> dict[str, nn.Module]:
    prefix = stack.layer_prefix(index) + "."
    return {n: m for n, m in targets.items() if n.startswith(prefix)}


def gradient_importance(
    model: nn.Module,
    stack: DecoderStack,
    captured: list[CapturedSample],
    targets: dict[str, nn.Module],
    kind: str = "fisher",
    offload: str = "cpu",
) -> GradientPass:
    """Block-wise backward of the answer loss; per-module, per-token raw importance."""
    import time

    start = time.perf_counter()
    reduce = _REDUCE[kind]
    norm, head = find_final_norm(model, stack), model.get_output_embeddings()
    n_layers = len(stack.layers)
    boundaries: list[list[torch.Tensor]] = [[s.hidden for s in captured]]
    with torch.no_grad():
        for i, layer in enumerate(tqdm(stack.layers, desc="tlq importance fwd", unit="layer", leave=False)):
            device = module_device(layer)
            boundaries.append(
                [
                    layer_forward(layer, h.to(device), to_device(s.kwargs, device)).to(offload)
                    for h, s in zip(boundaries[i], captured)
                ]
            )
    raw: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    layer_raw: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    grads: list[torch.Tensor] = []
    total = 0.0
    with _NoParamGrad(model), torch.enable_grad():
        device = module_device(head)
        for h, s in zip(boundaries[-1], captured):
            h = h.to(device).detach().requires_grad_(True)
            loss = answer_loss(head(norm(h)), s.labels)
            loss.backward()
            total += float(loss.detach())
            grads.append(h.grad.to(offload))
        for i in tqdm(range(n_layers - 1, -1, -1), desc="tlq importance bwd", unit="layer", leave=False):
            layer, device = stack.layers[i], module_device(stack.layers[i])
            layer_raw[i] = [reduce(g[0]).cpu() for g in grads]
            grabber = _OutputGrabber(_layer_targets(stack, targets, i))
            try:
                new_grads = []
                for h, g, s in zip(boundaries[i], grads, captured):
                    h = h.to(device).detach().requires_grad_(True)
                    out = layer_forward(layer, h, to_device(s.kwargs, device))
                    out.backward(g.to(device))
                    for name, output in grabber.outputs.items():
                        raw[name].append(reduce(output.grad[0]).cpu())
                    new_grads.append(h.grad.to(offload))
                    grabber.outputs.clear()
                grads = new_grads
            finally:
                grabber.remove()
    loss = total / max(len(captured), 1)
    logger.info("tlq importance: answer loss %.4f over %d samples", loss, len(captured))
    return GradientPass(raw, boundaries, layer_raw, loss, time.perf_counter() - start)


def reference_importance(
    model: nn.Module,
    stack: DecoderStack,
    captured: list[CapturedSample],
    targets: dict[str, nn.Module],
    kind: str = "fisher",
) -> dict[str, list[torch.Tensor]]:
    """The same raw importance from one full-graph backward (for testing the block-wise pass)."""
    reduce = _REDUCE[kind]
    norm, head = find_final_norm(model, stack), model.get_output_embeddings()
    raw: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    grabber = _OutputGrabber(targets)
    try:
        with _NoParamGrad(model), torch.enable_grad():
            for s in captured:
                h = s.hidden.detach().requires_grad_(True)
                for layer in stack.layers:
                    h = layer_forward(layer, h, s.kwargs)
                answer_loss(head(norm(h)), s.labels).backward()
                for name in targets:
                    raw[name].append(reduce(grabber.outputs[name].grad[0]).cpu())
                grabber.outputs.clear()
    finally:
        grabber.remove()
    return raw


def temper(raw: torch.Tensor, t: Tempering) -> torch.Tensor:
    """Normalise one sample's raw importance to mean 1, then temper, clip and mix (zero-free, finite)."""
    a = raw.float().clamp_min(0)
    mean = a.mean()
    a = a / mean if mean > 0 and torch.isfinite(mean) else torch.ones_like(a)
    a = a.pow(t.gamma).clamp(t.lo, t.hi)
    return (1 - t.mix) * a + t.mix


def modality_balance(raw: list[torch.Tensor], vision_masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """MBQ-style weights: every token gets the mean raw importance of its modality (over all samples)."""
    vis = torch.cat([r[m] for r, m in zip(raw, vision_masks)])
    txt = torch.cat([r[~m] for r, m in zip(raw, vision_masks)])
    v_mean = float(vis.mean()) if vis.numel() else 0.0
    t_mean = float(txt.mean()) if txt.numel() else 0.0
    return [torch.where(m, torch.full_like(r, v_mean), torch.full_like(r, t_mean)) for r, m in zip(raw, vision_masks)]


def select_tokens(weights: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Keep the ``ceil(fraction * N)`` most important tokens over all samples (others get weight 0)."""
    if fraction >= 1.0:
        return weights
    flat = torch.cat(weights)
    k = max(1, math.ceil(fraction * flat.numel()))
    threshold = torch.topk(flat, k).values.min()
    ties_left = k - int((flat > threshold).sum())  # ties at the threshold are kept in order
    kept = []
    for w in weights:
        keep = w > threshold
        ties = (w == threshold).nonzero().flatten()[:ties_left]
        keep[ties] = True
        ties_left -= len(ties)
        kept.append(torch.where(keep, w, torch.zeros_like(w)))
    return kept
