"""Weight grids: the values one quantized weight element can take, and how a group's scale is chosen for them.

A :class:`Grid` owns the three steps every solver and kernel shares: a group's quantization parameters from its
weights (min/max, optionally clipped), rounding a scaled weight onto the grid (:meth:`Grid.encode`) and mapping
codes back (:meth:`Grid.decode`). :mod:`tlq_hf.primitives` and the GPTQ sweep call these instead of integer
formulas, so a grid with other values is one more registered class; ``QuantScheme.grid`` names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .registry import Registry

if TYPE_CHECKING:
    from .qtypes import QuantScheme

__all__ = ["GRIDS", "Grid", "IntGrid", "QParams", "grid_of"]


@dataclass
class QParams:
    """Per-group quantization parameters: ``scale`` in its storage dtype, signed integer ``zero`` (int8)."""

    scale: torch.Tensor
    zero: torch.Tensor


class Grid(ABC):
    """The representable values of one weight format, in units of a group's scale."""

    name: ClassVar[str]
    #: dtype of the codes :meth:`encode` returns once stored (before any packing)
    code_dtype: ClassVar[torch.dtype]

    @abstractmethod
    def qparams(
        self,
        groups: torch.Tensor,
        scheme: QuantScheme,
        scale_dtype: torch.dtype,
        clip: torch.Tensor | float | None = None,
    ) -> QParams:
        """Quantization parameters of ``groups [rows, n_groups, group_size]`` (float32), the scale rounded to
        ``scale_dtype``; ``clip`` in ``(0, 1]`` shrinks the range (scalar or ``[rows, n_groups]``)."""

    @abstractmethod
    def encode(self, scaled: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """Codes (float values on the grid, the zero point added) of ``scaled = w / scale``."""

    def decode(self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``(codes - zero) * scale`` in the dtype of its operands (callers choose it)."""
        return (codes - zero) * scale


#: weight grids by name; ``QuantScheme(grid=...)`` takes these names
GRIDS: Registry[Grid] = Registry("weight grid", instantiate=True)


@GRIDS.register
class IntGrid(Grid):
    """Signed integers ``[-2**(b-1), 2**(b-1) - 1]`` with a zero point, the arithmetic of compressed-tensors' ``int``
    type: the range always holds 0, ``scale = absmax / ((qmax - qmin) / 2)`` when symmetric, else
    ``(max - min) / (qmax - qmin)`` with a rounded zero point."""

    name = "int"
    code_dtype = torch.int8

    def qparams(
        self,
        groups: torch.Tensor,
        scheme: QuantScheme,
        scale_dtype: torch.dtype,
        clip: torch.Tensor | float | None = None,
    ) -> QParams:
        wmin = groups.amin(dim=-1).clamp(max=0)
        wmax = groups.amax(dim=-1).clamp(min=0)
        if clip is not None:
            wmin, wmax = wmin * clip, wmax * clip
        bit_range = float(scheme.qmax - scheme.qmin)
        if scheme.sym:
            scale = torch.maximum(wmin.abs(), wmax) / (bit_range / 2)
            zero = torch.zeros_like(scale)
        else:
            scale = (wmax - wmin) / bit_range
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.clamp(torch.round(scheme.qmin - wmin / safe), scheme.qmin, scheme.qmax)
        scale = scale.to(scale_dtype)
        eps = torch.finfo(scale_dtype).eps
        scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
        return QParams(scale=scale, zero=zero.to(torch.int8))

    def encode(self, scaled: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return torch.clamp(torch.round(scaled) + zero, scheme.qmin, scheme.qmax)


def grid_of(scheme: QuantScheme) -> Grid:
    """The :class:`Grid` named by ``scheme.grid``."""
    return GRIDS[scheme.grid]
