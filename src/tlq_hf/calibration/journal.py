"""The edits a quantization run makes to a model, recorded so that a failed run can put the model back.

A run changes a model in two ways: it swaps packed modules in for linears, and smoothing (or a resumed
checkpoint) writes into tensors in place. :class:`ModelEdits` performs the swaps and is told before each
in-place write; with ``undo=True`` it keeps the replaced modules and a copy of each tensor's first value, and
:meth:`ModelEdits.rollback` restores them, last edit first. That costs memory (the replaced linears stay alive
until the run ends), so only runs on a model the caller keeps using ask for it (``tlq_hf.quantize``);
quantize-on-load never hands out a model whose run failed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import swap_module

__all__ = ["ModelEdits"]

logger = logging.getLogger(__name__)


class ModelEdits:
    """Module swaps and in-place tensor writes of one run (``undo``: kept for :meth:`rollback`)."""

    def __init__(self, model: nn.Module, undo: bool = False) -> None:
        self.model, self.undo = model, undo
        self._swaps: list[tuple[str, nn.Module]] = []
        self._writes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def swap(self, name: str, new: nn.Module) -> None:
        """Install ``new`` as submodule ``name`` (remembering the module it replaces); a packed module with
        non-finite scales is refused, naming the module."""
        scale = getattr(new, "weight_scale", None)
        if isinstance(scale, torch.Tensor) and scale.device.type != "meta" and not torch.isfinite(scale).all():
            raise FloatingPointError(
                f"{name}: quantization produced NaN/Inf scales: the layer's weights hold NaN/Inf (check the "
                "checkpoint) or overflowed in their dtype (load the model in bfloat16 or float32)."
            )
        if self.undo:
            self._swaps.append((name, self.model.get_submodule(name)))
        swap_module(self.model, name, new)

    def will_write(self, tensors: list[torch.Tensor]) -> None:
        """Called before ``tensors`` are changed in place: their current values are kept (once per tensor)."""
        if not self.undo:
            return
        for t in tensors:
            if id(t) not in self._writes and t.device.type != "meta":
                self._writes[id(t)] = (t, t.detach().clone())

    @torch.no_grad()
    def rollback(self) -> None:
        """Put every written tensor and every swapped module back, last first."""
        for tensor, value in reversed(list(self._writes.values())):
            tensor.copy_(value)
        for name, original in reversed(self._swaps):
            swap_module(self.model, name, original)
        logger.warning(
            "tlq_hf: quantization did not finish; %d swapped modules and %d changed tensors were put back: the "
            "model is the full-precision model it was.",
            len(self._swaps),
            len(self._writes),
        )
        self._swaps.clear()
        self._writes.clear()
