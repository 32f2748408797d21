"""``TLQLinear``: a linear layer whose weight stays bit-packed in memory.

Buffers (all persistent, saved as ``<module>.<name>`` in the native ``tlq`` format); the scheme's weight grid
(:mod:`tlq_hf.grids`) fixes the storage of the codes and scales:

- ``weight_packed``: the codes. Integer grid: int32 ``[out, ceil(in * bits / 32)]``, packed along ``in``
  (see packing.py); ``fp8``: float8_e4m3fn ``[out, in]``; ``nvfp4`` / ``mxfp4``: uint8 ``[out, in / 2]``, two
  E2M1 values per byte;
- ``weight_scale``: ``[out, n_groups]``, one scale per (row, group): the model dtype (integer, ``fp8``),
  float8_e4m3fn (``nvfp4``, multiplied by the global scale) or uint8 E8M0 exponents (``mxfp4``);
- ``weight_global_scale``: float32 ``[1]`` (grids with a global scale: ``nvfp4``);
- ``weight_zero_point``: int8 ``[out, n_groups]``, signed zero point (asymmetric schemes only);
- ``input_global_scale``: float32 ``[1]``, the calibrated global scale of activation formats that have one
  (NVFP4 activations);
- ``bias``: model dtype ``[out]``, unchanged (if the layer had one).

The reference forward dequantizes the weight (``(q - zero) * scale`` in the scale's dtype for the integer grid,
as compressed-tensors does on reload) and, with an activation format, fake-quantizes the input first.
Where a low-bit kernel runs the layer (``kernels.py``), :func:`prepare_kernels` (called once at load, and
after quantize-on-load calibration) repacks the weight into the kernel's layout; the kernel's copy then
replaces ``weight_packed`` in memory, and ``weight_packed`` is regenerated exactly on save. Calibration
and anything that back-propagates into the input use the reference path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..grids import grid_of
from ..hostmem import MappedPages
from ..primitives import QParams, dequantize_codes
from ..qtypes import QuantScheme
from .kernels import LinearKernel, select_kernel

__all__ = ["TLQLinear", "dequant_cache", "prepare_kernels"]


class TLQLinear(nn.Module):
    """Weight-packed replacement for ``nn.Linear`` under a :class:`QuantScheme`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        scheme.check_in_features(in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = scheme.groups(in_features)
        grid = grid_of(scheme)
        self.register_buffer("weight_packed", self._empty_packed(device))
        scale_dtype = grid.stored_scale_dtype(dtype)
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, device=device).to(scale_dtype))
        if grid.has_global_scale:
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        if not scheme.sym:
            self.register_buffer(
                "weight_zero_point", torch.zeros(out_features, n_groups, dtype=torch.int8, device=device)
            )
        if scheme.calibrated_activations:
            self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        self._cache: torch.Tensor | None = None  # dense weight, only inside ``dequant_cache``
        self._caching = False
        self._kernel: LinearKernel | None = None  # set by ``prepare_kernel``; its state replaces weight_packed
        self._kernel_state: object = None
        self._kernel_checked = False
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    def _empty_packed(self, device: torch.device | str | None = None) -> torch.Tensor:
        shape, dtype = grid_of(self.scheme).storage((self.out_features, self.in_features), self.scheme)
        return torch.zeros(shape, device=device).to(dtype)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        qparams: QParams,
        scheme: QuantScheme,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> TLQLinear:
        """Build a module from ``codes [out, in]`` (the grid's codes: int8 for the integer grid) and their qparams
        (the solver's output); ``dtype``: the model dtype (bias, activations), by default the scale's."""
        out_features, in_features = codes.shape
        dtype = dtype or qparams.scale.dtype
        module = cls(in_features, out_features, scheme, bias=bias is not None, dtype=dtype, device=codes.device)
        module.weight_packed.copy_(grid_of(scheme).pack(codes, scheme))
        module.weight_scale.copy_(qparams.scale)
        if qparams.global_scale is not None:
            module.weight_global_scale.copy_(qparams.global_scale)
        if not scheme.sym:
            module.weight_zero_point.copy_(qparams.zero)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def codes(self) -> torch.Tensor:
        """The unpacked codes ``[out, in]`` (signed int8 for the integer grid, float32 values for float grids)."""
        if self._kernel is not None:
            return self._kernel.codes(self)
        return grid_of(self.scheme).unpack(self.weight_packed, self.scheme, (self.out_features, self.in_features))

    def packed_weight(self) -> torch.Tensor:
        """The ``weight_packed`` tensor as saved (regenerated from the kernel's copy when one replaced it)."""
        if self._kernel is not None:
            return grid_of(self.scheme).pack(self.codes(), self.scheme)
        return self.weight_packed

    @property
    def kernel_name(self) -> str:
        """The kernel running this layer's forward (``"dequantize"`` for the reference path)."""
        return "dequantize" if self._kernel is None else self._kernel.name

    def prepare_kernel(self) -> bool:
        """Repack into the first registered kernel that runs this layer; ``True`` when one does."""
        if not self._kernel_checked:
            self._kernel_checked = True
            kernel = select_kernel(self)
            if kernel is not None:
                self._kernel_state = kernel.prepare(self, self.codes())
                self._kernel = kernel
                self.register_buffer("weight_packed", None)  # the kernel's copy holds the same 4 bits/weight
        return self._kernel is not None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel is not None:
            destination[prefix + "weight_packed"] = self.packed_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._kernel is not None:  # back to the reference layout; the new weights are repacked on use
            self.register_buffer("weight_packed", self._empty_packed())
            self._kernel, self._kernel_state, self._kernel_checked = None, None, False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def qparams(self) -> QParams:
        zero = self.weight_zero_point if not self.scheme.sym else torch.zeros_like(self.weight_scale, dtype=torch.int8)
        return QParams(
            scale=self.weight_scale, zero=zero, global_scale=_float32(getattr(self, "weight_global_scale", None))
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight this module computes with."""
        return dequantize_codes(self.codes(), self.qparams(), self.scheme, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._caching and self._kernel is not None and not (torch.is_grad_enabled() and x.requires_grad):
            y = self._kernel.forward(self, x)  # the kernel quantizes activations itself
            return y if self.bias is None else y + self.bias.to(y.dtype)
        act = self.scheme.act_format
        if act is not None:
            x = act.fake_quantize(x, _float32(getattr(self, "input_global_scale", None)))
        if not self._caching:
            weight = self.dequantized_weight(dtype=x.dtype)
        else:
            if self._cache is None or self._cache.dtype != x.dtype:
                self._cache = self.dequantized_weight(dtype=x.dtype)
            weight = self._cache
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def _float32(scale: torch.Tensor | None) -> torch.Tensor | None:
    """A global scale as float32, the dtype it is computed and saved in (transformers 4.57 casts every float buffer
    it loads to the model's dtype)."""
    return None if scale is None else scale.float()


@contextmanager
def dequant_cache(module: nn.Module) -> Iterator[None]:
    """Inside the block, every :class:`TLQLinear` under ``module`` dequantizes its weight once and reuses it.

    For loops that run the same packed layer many times (calibration); memory returns to packed size on exit.
    """
    packed = [m for m in module.modules() if isinstance(m, TLQLinear)]
    for m in packed:
        m._caching = True
    try:
        yield
    finally:
        for m in packed:
            m._caching, m._cache = False, None


def prepare_kernels(module: nn.Module) -> dict[str, int]:
    """Repack every :class:`TLQLinear` under ``module`` for its kernel now (at load); counts per kernel."""
    counts: dict[str, int] = {}
    pages = MappedPages()  # a memory-mapped checkpoint's copy of a replaced weight goes back to the OS
    for m in module.modules():
        if isinstance(m, TLQLinear):
            packed = m.weight_packed
            if m.prepare_kernel() and packed is not None:
                pages.drop(packed)
            del packed
            counts[m.kernel_name] = counts.get(m.kernel_name, 0) + 1
    return counts
