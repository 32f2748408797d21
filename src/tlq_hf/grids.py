"""Weight grids: the values one quantized weight element can take, and how a group's scale is chosen for them.

A :class:`Grid` owns the three steps every solver and kernel shares: a group's quantization parameters from its
weights (min/max, optionally clipped), rounding a scaled weight onto the grid (:meth:`Grid.encode`) and mapping
codes back (:meth:`Grid.decode`). :mod:`tlq_hf.primitives` and the GPTQ sweep call these instead of integer
formulas, so a grid with other values is one more registered class; ``QuantScheme.grid`` names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

from .packing import pack, packed_shape, unpack
from .registry import Registry

if TYPE_CHECKING:
    from .qtypes import QuantScheme

__all__ = [
    "GRIDS",
    "FP8Grid",
    "Grid",
    "IntGrid",
    "MXFP4Grid",
    "NVFP4Grid",
    "QParams",
    "finite_scales",
    "grid_of",
    "round_to_e2m1",
]


@dataclass
class QParams:
    """Per-group quantization parameters: ``scale`` in its storage dtype, signed integer ``zero`` (int8), and for
    grids with a two-level scale (NVFP4) the tensor's float32 ``global_scale`` (the group scales are stored
    multiplied by it)."""

    scale: torch.Tensor
    zero: torch.Tensor
    global_scale: torch.Tensor | None = None


class Grid(ABC):
    """The representable values of one weight format, in units of a group's scale."""

    name: ClassVar[str]
    #: dtype of the codes :meth:`encode` returns once stored (before any packing)
    code_dtype: ClassVar[torch.dtype]
    #: whether a weight also stores a tensor-wide float32 global scale (``QParams.global_scale``)
    has_global_scale: ClassVar[bool] = False
    #: compressed-tensors' ``type`` of the elements and ``strategy`` of grouped scales
    ct_type: ClassVar[str] = "int"
    ct_group_strategy: ClassVar[str] = "group"
    #: the scale dtype compressed-tensors records (``None``: the model's dtype, left unwritten)
    ct_scale_dtype: ClassVar[torch.dtype | None] = None

    def check(self, scheme: QuantScheme) -> None:
        """Raise ``ValueError`` naming the fields when ``scheme`` does not fit this grid (every scheme fits here)."""
        return None

    def describe(self, scheme: QuantScheme) -> str:
        """``scheme``'s weights in words (the model card's scheme row)."""
        where = "per output channel" if scheme.group_size == -1 else f"in groups of {scheme.group_size}"
        return f"{self.elements(scheme)} weights {where}, {self.scales}"

    def elements(self, scheme: QuantScheme) -> str:
        return f"{scheme.bits}-bit {'symmetric' if scheme.sym else 'asymmetric'} integer"

    #: the scales in words
    scales: ClassVar[str] = "scales in the model's dtype"

    def global_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The tensor-wide scale of ``weight`` for grids with two-level scales, else ``None``."""
        return None

    def stored_scale_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        """The dtype :meth:`qparams` stores scales in, given the model's ``scale_dtype`` (which most grids keep)."""
        return scale_dtype

    @abstractmethod
    def qparams(
        self,
        groups: torch.Tensor,
        scheme: QuantScheme,
        scale_dtype: torch.dtype,
        clip: torch.Tensor | float | None = None,
        global_scale: torch.Tensor | None = None,
    ) -> QParams:
        """Quantization parameters of ``groups [rows, n_groups, group_size]`` (float32), the scale rounded to
        ``scale_dtype`` (grids with a scale format of their own ignore it); ``clip`` in ``(0, 1]`` shrinks the
        range (scalar or ``[rows, n_groups]``); ``global_scale`` is :meth:`global_scale` of the whole weight."""

    def group_scale(self, qparams: QParams) -> torch.Tensor:
        """The multiplier of each group's codes, in the dtype dequantization computes in (the stored scale itself
        for the integer grid)."""
        return qparams.scale

    @abstractmethod
    def encode(self, scaled: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """Codes (float values on the grid, the zero point added) of ``scaled = w / scale``."""

    def decode(self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``(codes - zero) * scale`` in the dtype of its operands (callers choose it)."""
        return (codes - zero) * scale

    def ct_args(self, scheme: QuantScheme) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` fields of ``scheme``'s weights on this grid."""
        grouped = scheme.group_size != -1
        args = {
            "num_bits": scheme.bits,
            "type": self.ct_type,
            "symmetric": scheme.sym,
            "strategy": self.ct_group_strategy if grouped else "channel",
            "group_size": scheme.group_size if grouped else None,
            "dynamic": False,
        }
        if self.ct_scale_dtype is not None:
            args["scale_dtype"] = self.ct_scale_dtype
        return args

    def ct_scale(self, qparams: QParams) -> torch.Tensor:
        """The group scales as compressed-tensors' compressors take them before compressing (the stored ones, except
        where compressed-tensors stores another encoding of them)."""
        return qparams.scale

    @abstractmethod
    def storage(self, shape: tuple[int, int], scheme: QuantScheme) -> tuple[tuple[int, int], torch.dtype]:
        """Shape and dtype of :meth:`pack`'s result for codes of ``shape`` (``[out, in]``)."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """Codes ``[out, in]`` in their densest in-memory form (compressed-tensors' own packing functions)."""

    @abstractmethod
    def unpack(self, packed: torch.Tensor, scheme: QuantScheme, shape: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`pack`: the codes of ``shape`` in :attr:`code_dtype`."""


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
        global_scale: torch.Tensor | None = None,
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

    def storage(self, shape, scheme):
        return packed_shape(shape, scheme.bits), torch.int32

    def pack(self, codes, scheme):
        return pack(codes, scheme.bits)

    def unpack(self, packed, scheme, shape):
        return unpack(packed, scheme.bits, shape)


# ----------------------------------------------------------------------------- float grids

#: E2M1 (FP4) magnitudes, and the midpoints between neighbours
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E4M3 = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(_E4M3).max)  # 448


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 value of each element (ties to the even code: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4),
    beyond +-6 the end of the grid; same dtype as ``x``."""
    magnitude = x.abs()
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=x.dtype, device=x.device)
    index = torch.bucketize(magnitude, mids)  # ties counted down
    tie = (index % 2 == 1) & (magnitude == mids[index.clamp(max=len(_E2M1_MIDPOINTS) - 1)])
    values = torch.tensor(_E2M1, dtype=x.dtype, device=x.device)[index + tie.long()]
    return torch.where(x < 0, -values, values)


class _FloatGrid(Grid):
    """Symmetric float elements (no zero point): codes are the element values themselves, kept in float32."""

    code_dtype = torch.float32
    ct_type = "float"
    element_max: ClassVar[float]
    bits: ClassVar[int]
    group_size: ClassVar[int | None] = None  # the format's fixed group size (None: any, like the integer grid)

    def check(self, scheme: QuantScheme) -> None:
        wrong = []
        if scheme.bits != self.bits:
            wrong.append(f"bits={scheme.bits} (use {self.bits})")
        if not scheme.sym:
            wrong.append("sym=False (float grids are symmetric)")
        if self.group_size is not None and scheme.group_size != self.group_size:
            wrong.append(f"group_size={scheme.group_size} (use {self.group_size})")
        if wrong:
            raise ValueError(f"grid={self.name!r} does not fit {', '.join(wrong)}.")

    def encode(self, scaled: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return self._round(torch.clamp(scaled, -self.element_max, self.element_max))

    @abstractmethod
    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest element value of each (already clamped) element, same dtype."""

    @staticmethod
    def _absmax(groups: torch.Tensor, clip: torch.Tensor | float | None) -> torch.Tensor:
        amax = torch.maximum(groups.amin(dim=-1).clamp(max=0).abs(), groups.amax(dim=-1).clamp(min=0))
        return amax if clip is None else amax * clip

    @staticmethod
    def _zero(scale: torch.Tensor) -> torch.Tensor:
        return torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)


@GRIDS.register
class FP8Grid(_FloatGrid):
    """FP8 E4M3 elements, one scale per row or group in the model's dtype (compressed-tensors' FP8 weights:
    ``scale = absmax / 448``)."""

    name = "fp8"
    bits = 8
    element_max = _E4M3_MAX

    def elements(self, scheme: QuantScheme) -> str:
        return "FP8 (E4M3)"

    def qparams(self, groups, scheme, scale_dtype, clip=None, global_scale=None) -> QParams:
        scale = (self._absmax(groups, clip) / self.element_max).to(scale_dtype)
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps), scale)
        return QParams(scale=scale, zero=self._zero(scale))

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(_E4M3).to(x.dtype)

    def storage(self, shape, scheme):
        return tuple(shape), _E4M3

    def pack(self, codes, scheme):
        return codes.to(_E4M3)

    def unpack(self, packed, scheme, shape):
        return packed.to(self.code_dtype).reshape(shape)


class _FP4Grid(_FloatGrid):
    """E2M1 elements, two per byte (compressed-tensors' ``pack_fp4_to_uint8`` layout: the even column in the low
    nibble, sign in each nibble's high bit)."""

    bits = 4
    element_max = 6.0

    def elements(self, scheme: QuantScheme) -> str:
        return "FP4 (E2M1)"

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return round_to_e2m1(x)

    def storage(self, shape, scheme):
        return (shape[0], shape[1] // 2), torch.uint8

    def pack(self, codes, scheme):
        return pack_fp4_to_uint8(codes.float())

    def unpack(self, packed, scheme, shape):
        return unpack_fp4_from_uint8(packed, shape[0], shape[1], dtype=self.code_dtype)


@GRIDS.register
class NVFP4Grid(_FP4Grid):
    """NVFP4: E2M1 elements in groups of 16, each group's scale an E4M3 number stored multiplied by the tensor's
    float32 global scale ``448 * 6 / absmax(W)`` (so the group scales use E4M3's whole range); the element
    multiplier is ``scale / global_scale``."""

    name = "nvfp4"
    group_size = 16
    has_global_scale = True
    ct_group_strategy = "tensor_group"
    ct_scale_dtype = _E4M3
    scales = "FP8 (E4M3) scales under a float32 per-tensor global scale"

    def global_scale(self, weight: torch.Tensor) -> torch.Tensor:
        amax = weight.detach().float().abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        scale = torch.nan_to_num(_E4M3_MAX * self.element_max / amax, nan=1.0, posinf=1.0, neginf=1.0)
        return scale.reshape(1)

    def qparams(self, groups, scheme, scale_dtype, clip=None, global_scale=None) -> QParams:
        if global_scale is None:
            global_scale = self.global_scale(groups)
        scale = global_scale * (self._absmax(groups, clip) / self.element_max)
        scale = torch.clamp(scale, -_E4M3_MAX, _E4M3_MAX).to(_E4M3).float()
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(_E4M3).eps), scale)
        return QParams(scale=scale.to(_E4M3), zero=self._zero(scale), global_scale=global_scale)

    def stored_scale_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return _E4M3

    def group_scale(self, qparams: QParams) -> torch.Tensor:
        return qparams.scale.float() / qparams.global_scale

    def ct_scale(self, qparams: QParams) -> torch.Tensor:
        return qparams.scale.float()  # the E4M3 values; compressed-tensors computes with them unconverted


@GRIDS.register
class MXFP4Grid(_FP4Grid):
    """MXFP4 (OCP microscaling): E2M1 elements in groups of 32, each group's scale a power of two stored as its
    biased E8M0 exponent (uint8): ``2 ** (floor(log2(absmax)) - 2)``, the exponent one higher when the mantissa of
    ``absmax`` is 1.75 or more."""

    name = "mxfp4"
    group_size = 32
    ct_scale_dtype = torch.uint8
    scales = "power-of-two (E8M0) scales"

    def qparams(self, groups, scheme, scale_dtype, clip=None, global_scale=None) -> QParams:
        amax = self._absmax(groups, clip).float()
        mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
        power = exponent.float() - 1 + (mantissa >= 0.875).float()  # log2 of amax rounded to a power of two
        biased = torch.where(amax > 0, 127 + power - 2, torch.zeros_like(power))
        scale = biased.clamp(0, 255).to(torch.uint8)
        return QParams(scale=scale, zero=self._zero(scale))

    def stored_scale_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8  # the biased E8M0 exponent

    def group_scale(self, qparams: QParams) -> torch.Tensor:
        return torch.exp2(qparams.scale.float() - 127)

    def ct_scale(self, qparams: QParams) -> torch.Tensor:
        return self.group_scale(qparams)  # compressed-tensors takes the power of two and stores its exponent


def finite_scales(scale: torch.Tensor) -> bool:
    """Whether every stored scale is a finite number, in any grid's storage (an E8M0 exponent of 255 is NaN)."""
    if scale.dtype == torch.uint8:
        return bool((scale != 255).all())
    return bool(torch.isfinite(scale.float()).all())


def grid_of(scheme: QuantScheme) -> Grid:
    """The :class:`Grid` named by ``scheme.grid``."""
    return GRIDS[scheme.grid]
