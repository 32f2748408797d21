"""The edits a quantization run makes to a model, recorded so that a failed run can put the model back.

A run changes a model in three ways: it swaps packed modules in for linears; smoothing (or a resumed
checkpoint) writes into tensors in place; and a calibrated layer is *re-homed*: its tensors are replaced by
settled ones (cast back from the float32 copies a CPU computes with, materialised, or written to a new
offload file) and its accelerate hooks are pointed at where they now live. :class:`ModelEdits` performs the
swaps and is told before each in-place write and each re-homing; with ``undo=True`` it keeps the replaced
modules, a copy of each written tensor's first value, and each re-homed module's tensor objects and hook
settings, and :meth:`ModelEdits.rollback` restores them, last edit first. That costs memory (the replaced
linears stay alive until the run ends), so only runs on a model the caller keeps using ask for it (``tlq_hf.quantize``);
quantize-on-load never hands out a model whose run failed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import swap_module
from ..grids import finite_scales
from .offload import all_hooks

__all__ = ["ModelEdits"]

logger = logging.getLogger(__name__)


class ModelEdits:
    """Module swaps and in-place tensor writes of one run (``undo``: kept for :meth:`rollback`)."""

    def __init__(self, model: nn.Module, undo: bool = False) -> None:
        self.model, self.undo = model, undo
        self._swaps: list[tuple[str, nn.Module]] = []
        self._writes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._homes: dict[int, tuple[nn.Module, dict, dict]] = {}  # module id -> (module, tensors, buffers)
        self._hooks: dict[int, tuple[object, dict]] = {}  # hook id -> (hook, its settings)

    def swap(self, name: str, new: nn.Module) -> None:
        """Install ``new`` as submodule ``name`` (remembering the module it replaces); a packed module with
        non-finite scales is refused, naming the module."""
        scale = getattr(new, "weight_scale", None)
        if isinstance(scale, torch.Tensor) and scale.device.type != "meta" and not finite_scales(scale):
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

    def will_rehome(self, layer: nn.Module) -> None:
        """Called before ``layer`` is onloaded to stay (settled afterwards): the tensor objects of its modules
        and the settings of their accelerate hooks are kept (once per module and hook). References only: no
        tensor is copied."""
        if not self.undo:
            return
        for module in layer.modules():
            if id(module) not in self._homes:
                self._homes[id(module)] = (module, dict(module._parameters), dict(module._buffers))
            for hook in all_hooks(module):
                if id(hook) not in self._hooks:
                    settings = {k: getattr(hook, k) for k in self._HOOK_SETTINGS if hasattr(hook, k)}
                    self._hooks[id(hook)] = (hook, settings)

    #: What onloading and settling change on an accelerate hook.
    _HOOK_SETTINGS = ("weights_map", "offload", "offload_buffers")

    @torch.no_grad()
    def rollback(self) -> None:
        """Put every written tensor, every swapped module and every re-homed module back, last first."""
        for tensor, value in reversed(list(self._writes.values())):
            tensor.copy_(value)
        for name, original in reversed(self._swaps):
            swap_module(self.model, name, original)
        for module, params, buffers in self._homes.values():
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        for hook, settings in self._hooks.values():
            for key, value in settings.items():
                setattr(hook, key, value)
        logger.warning(
            "tlq_hf: quantization did not finish; %d swapped modules and %d changed tensors were put back: the "
            "model is the full-precision model it was.",
            len(self._swaps),
            len(self._writes),
        )
        self._swaps.clear()
        self._writes.clear()
        self._homes.clear()
        self._hooks.clear()
