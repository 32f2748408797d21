"""Smoothing: per-channel scales migrated from a layer's inputs into its weights (AWQ, SmoothQuant) by folding.

A fold divides a producer's output channels (a norm, or a linear) by ``s`` and multiplies the consumers' input
columns by ``s``, leaving the layer's function unchanged. :class:`Smoothing` applies every (producer, consumers)
mapping of a layer (``arch.smooth_mappings``) whose fold provably leaves the layer unchanged
(:func:`folds_preserve_output`), with the scale from the method's smoother (``tlq_hf.solvers.SMOOTHERS``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..arch import smooth_mappings
from ..qtypes import QuantScheme
from ..solvers import Smoother
from .distributed import Comm
from .journal import ModelEdits
from .schedule import SolveScheduler
from .stats import StatGroup

__all__ = ["Smoothing", "fold", "folds_preserve_output", "weight_offset"]

logger = logging.getLogger(__name__)


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


def fold(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
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


class Smoothing:
    """Folds the smoother's scales into one layer at a time; remembers per (producer, consumers) mapping whether a
    fold there preserves the layer (checked at the first layer that has it, agreed over ranks)."""

    def __init__(
        self, model: nn.Module, smoother: Smoother, scheme: QuantScheme, settings, comm: Comm, edits: ModelEdits
    ) -> None:
        self.model, self.smoother, self.scheme, self.cfg = model, smoother, scheme, settings
        self.comm, self.edits = comm, edits
        self.scheduler = SolveScheduler(comm)
        self._checked: dict[tuple[str, tuple[str, ...]], bool] = {}

    def apply(
        self,
        layer: nn.Module,
        groups: list[StatGroup],
        prefix: str,
        compute: torch.dtype,
        run_one: Callable[[], torch.Tensor],
    ) -> None:
        """Fold per-channel scales for every mapping whose consumers are all targets and whose fold leaves the
        layer unchanged (a rejected mapping is logged and skipped everywhere).

        The scale is searched by its owner rank on the first consumer's statistics (the consumers share their
        input) and broadcast; every consumer's statistics are rescaled after the fold.
        """
        by_member = {m: g for g in groups for m in g.members}
        names = dict(layer.named_modules())
        mappings = list(smooth_mappings(self.model, layer))
        owners = self.scheduler.owners([self.scheduler.cost([names[c] for c in cs]) for _, cs in mappings])
        for (producer, consumers), owner in zip(mappings, owners):
            affected = [by_member.get(prefix + c) for c in consumers]
            if any(g is None for g in affected) or not self._preserves(layer, producer, consumers, run_one):
                continue
            weights = [names[c].weight.to(compute) for c in consumers]
            s = torch.empty(weights[0].shape[1], dtype=torch.float32, device=weights[0].device)
            if self.comm.rank == owner:
                s = self.smoother.scales(weights, affected[0], self.scheme, self.cfg).float()
            self.comm.broadcast_(s, owner)
            touched = [names[producer], *(names[c] for c in consumers)]
            self.edits.will_write([t for m in touched for t in (m.weight, getattr(m, "bias", None)) if t is not None])
            fold(names[producer], [names[c] for c in consumers], s)
            for group in {id(g): g for g in affected}.values():
                group.rescale(s)

    def _preserves(
        self, layer: nn.Module, producer: str, consumers: list[str], run_one: Callable[[], torch.Tensor]
    ) -> bool:
        key = (producer, tuple(consumers))
        if key not in self._checked:
            ok = folds_preserve_output(layer, producer, consumers, run_one)
            (agree,) = self.comm.sum(float(ok))
            self._checked[key] = agree == self.comm.world
            if not self._checked[key]:
                logger.info(
                    "tlq smoothing: %s -> %s skipped: a scale folded there would change the layer's output",
                    producer,
                    ", ".join(consumers),
                )
        return self._checked[key]
