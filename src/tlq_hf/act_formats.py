"""Activation formats: how a quantized layer's input is quantized on the fly, one registered type per format.

``QuantScheme(act_bits=..., act_grid=...)`` names one: ``"int"`` (dynamic symmetric per-token int8, W8A8 / W4A8),
``"fp8"`` (dynamic per-token FP8 E4M3, compressed-tensors' ``FP8_DYNAMIC``), ``"nvfp4"`` (E2M1 in groups of 16
with dynamic E4M3 group scales under a per-layer float32 global scale calibrated once, compressed-tensors'
``NVFP4`` W4A4) or ``"mxfp4"`` (E2M1 in groups of 32 with dynamic E8M0 scales, ``MXFP4``). The element grids and
scale rules are the weight grids' (:mod:`tlq_hf.grids`), applied per token row, so activations and weights
cannot drift apart. Each format also states its compressed-tensors
``input_activations`` arguments: the checkpoint writer and reader ask it instead of comparing names.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .grids import GRIDS
from .registry import Registry

__all__ = [
    "ACT_FORMATS",
    "ActFormat",
    "FP8TokenActivations",
    "IntTokenActivations",
    "MXFP4Activations",
    "NVFP4Activations",
]


class ActFormat(ABC):
    """One dynamic activation format (activations of ``[..., in]`` quantized over the last dimension)."""

    name: ClassVar[str]
    bits: ClassVar[int]
    #: whether a layer stores a float32 ``input_global_scale`` calibrated on the calibration inputs (NVFP4)
    has_global_scale: ClassVar[bool] = False
    #: the scheme name's activation part, e.g. ``"A8"``
    label: ClassVar[str]
    #: the activations in words (the model card's scheme row)
    description: ClassVar[str]

    @abstractmethod
    def fake_quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` quantized and dequantized as the packed layer's forward sees it, in ``x``'s dtype;
        ``global_scale``: the layer's calibrated one (formats with :attr:`has_global_scale`; ``None``: ``x``'s own)."""

    @abstractmethod
    def ct_args(self) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` fields of these activations."""

    def global_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The calibrated global scale of inputs whose largest magnitude is ``absmax``."""
        raise TypeError(f"{self.name} activations have no global scale")


#: activation formats by name; ``QuantScheme(act_grid=...)`` takes these names
ACT_FORMATS: Registry[ActFormat] = Registry("activation format", instantiate=True)


def _per_group(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """``x`` as ``[tokens, groups, group]`` in its own dtype (``group=None``: one group per token)."""
    rows = x.reshape(-1, x.shape[-1])
    width = rows.shape[-1] if group is None else group
    return rows.reshape(rows.shape[0], -1, width)


@ACT_FORMATS.register
class IntTokenActivations(ActFormat):
    """Dynamic symmetric per-token int8 (compressed-tensors' ``int`` ``token`` ``dynamic`` arguments)."""

    name = "int"
    bits = 8
    label = "A8"
    description = "dynamic per-token int8 activations"

    def fake_quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        from .primitives import fake_quantize_activation  # primitives imports the scheme types

        return fake_quantize_activation(x, self.bits)

    def ct_args(self) -> dict[str, Any]:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


class _GridActivations(ActFormat):
    """Activations on a weight grid's elements with one scale per token (``group=None``) or per group. Ranges,
    scales and the division happen in the activation's dtype with torch's type promotion, as compressed-tensors'
    dynamic quantization does them, so a reloaded checkpoint computes exactly what calibration saw. The
    compressed-tensors arguments follow from the grid: its element type, bits and scale dtype; per-token scales, or
    the grid's grouped strategy; ``dynamic="local"`` where a calibrated global scale sits above the dynamic ones."""

    grid: ClassVar[str]
    group: ClassVar[int | None] = None

    @functools.cached_property
    def _scheme(self):
        """The weight-grid scheme whose rounding the activations use (built once, not per forward)."""
        from .qtypes import QuantScheme  # qtypes imports this module's registry

        return QuantScheme(bits=self.bits, group_size=self.group or -1, grid=self.grid)

    def ct_args(self) -> dict[str, Any]:
        grid = GRIDS[self.grid]
        args = {
            "num_bits": self.bits,
            "type": grid.ct_type,
            "symmetric": True,
            "strategy": "token" if self.group is None else grid.ct_group_strategy,
            "group_size": self.group,
            "dynamic": "local" if self.has_global_scale else True,
            "scale_dtype": grid.ct_scale_dtype,
        }
        return {k: v for k, v in args.items() if v is not None}

    def fake_quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        grid, scheme = GRIDS[self.grid], self._scheme
        groups = _per_group(x, self.group)
        if grid.has_global_scale and global_scale is None:
            global_scale = grid.global_scale(groups)
        qp = grid.qparams(groups, scheme, x.dtype, global_scale=global_scale)
        scale = grid.group_scale(qp).unsqueeze(-1)
        codes = grid.encode(groups / scale, qp.zero.unsqueeze(-1), scheme)
        return (codes.to(scale.dtype) * scale).to(x.dtype).reshape(x.shape)


@ACT_FORMATS.register
class FP8TokenActivations(_GridActivations):
    """Dynamic per-token FP8 E4M3 (``scale = absmax / 448`` in the activation dtype), as ``FP8_DYNAMIC``."""

    name = "fp8"
    bits = 8
    label = "A8-fp8"
    description = "dynamic per-token FP8 (E4M3) activations"
    grid = "fp8"


@ACT_FORMATS.register
class NVFP4Activations(_GridActivations):
    """NVFP4 activations: E2M1 in groups of 16, each group's E4M3 scale computed on the fly under the layer's
    static float32 global scale ``448 * 6 / absmax`` (absmax over the calibration inputs), as the ``NVFP4``
    preset's ``tensor_group`` ``dynamic="local"`` arguments."""

    name = "nvfp4"
    bits = 4
    label = "A4-nvfp4"
    description = "FP4 (E2M1) activations in groups of 16, dynamic E4M3 scales under a calibrated global scale"
    grid = "nvfp4"
    group = 16
    has_global_scale = True

    def global_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        return GRIDS[self.grid].global_scale(absmax.reshape(1))


@ACT_FORMATS.register
class MXFP4Activations(_GridActivations):
    """MXFP4 activations: E2M1 in groups of 32 with dynamic power-of-two (E8M0) group scales, as the ``MXFP4``
    preset's input arguments."""

    name = "mxfp4"
    bits = 4
    label = "A4-mxfp4"
    description = "FP4 (E2M1) activations in groups of 32, dynamic power-of-two scales"
    grid = "mxfp4"
    group = 32
