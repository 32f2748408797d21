"""Low-bit matmul kernels for :class:`~tlq_hf.nn.quant_linear.TLQLinear`: a registry of small kernel types.

A kernel takes over a packed layer's forward once it is *prepared* (repacked into the kernel's own layout,
once, at load or at the first inference forward). Layers no kernel supports keep the reference path
(dequantize, then ``F.linear``); the reason is logged once per reason, so users know why they got it.

Kernels, picked by measurement on the machines we run (AMD EPYC, 2 threads; ``benchmarks/inference.py``):

- :class:`Int4PackCPU`: torch's ``_weight_int4pack_mm_for_cpu`` for W4 weight-only, group 32/64/128, bf16 or
  fp16 models on CPU. One 2048x8192 decode GEMV: 0.45 ms vs 1.36 ms for the bf16 dense matmul (3.0x);
  with fp32 activations the same kernel is 4.4x *slower* than fp32 dense, so fp32 models keep the
  reference path. The kernel's packed copy replaces the int32 ``weight_packed`` buffer (same 4 bits per
  weight); ``weight_packed`` is regenerated exactly from it when the model is saved.
- :class:`IntMMCPU`: torch's ``_int_mm`` (int8 x int8 -> int32) for W8A8 with one weight scale per output
  channel, on CPU, any float dtype. Activations are quantized per token exactly as the reference does; the
  integer product is exact, so only the final scaling rounds. One 2048x8192 decode GEMV: 0.21 ms vs 1.49 ms
  bf16 dense (7x) and 3.6 ms fp32 dense; 32 rows: 3.3 ms vs 3.8 ms bf16. The int8 codes ``[out, in]``
  (1 byte/weight, as packed) replace ``weight_packed``.

On CUDA no kernel is registered yet: packed layers there take the reference path (the reason is logged).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Protocol

import torch

from ..primitives import quantize_activation
from ..registry import Registry

if TYPE_CHECKING:
    from .quant_linear import TLQLinear

__all__ = ["LinearKernel", "Int4PackCPU", "IntMMCPU", "KERNELS", "select_kernel"]

logger = logging.getLogger("tlq_hf")
_logged: set[str] = set()

#: kernels in the order they are tried; a kernel class registers itself with ``@KERNELS.register`` (one instance)
KERNELS: Registry[LinearKernel] = Registry("kernel", instantiate=True)


def _cpu_op_missing(kernel: str, op: str, module: TLQLinear) -> str | None:
    """Why a CPU kernel built on ``torch.<op>`` cannot run ``module`` here (``None`` if it can, so far)."""
    if not hasattr(torch, op):
        return f"this torch has no {op}"
    if module.weight_scale.device.type != "cpu":
        return f"{kernel} runs on CPU; the layer is on {module.weight_scale.device.type}"
    return None


class LinearKernel(Protocol):
    """What a kernel provides. State it needs lives on the module (``module._kernel_state``)."""

    name: str

    def unsupported(self, module: TLQLinear) -> str | None:
        """Why this kernel cannot run ``module`` (``None`` when it can)."""

    def prepare(self, module: TLQLinear, codes: torch.Tensor) -> object:
        """Build the kernel's state from the module's signed int8 ``codes [out, in]`` and qparams."""

    def forward(self, module: TLQLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` (no bias) with the module's weight, from the prepared state; ``x`` is the layer's
        input before any activation quantization (the kernel applies the scheme's)."""

    def codes(self, module: TLQLinear) -> torch.Tensor:
        """The signed int8 codes, recovered exactly from the prepared state (for saving)."""


@KERNELS.register
class Int4PackCPU:
    """torch's CPU int4 weight-packed matmul (``aten._weight_int4pack_mm_for_cpu``)."""

    name = "int4pack-cpu"
    GROUPS = (32, 64, 128)
    DTYPES = (torch.bfloat16, torch.float16)
    INNER_K_TILES = 2
    #: Rows packed as one independent block (torch packs 64 output rows at a time; verified on every unpack).
    BLOCK_ROWS = 64

    def unsupported(self, module: TLQLinear) -> str | None:
        s = module.scheme
        if (reason := _cpu_op_missing(self.name, "_weight_int4pack_mm_for_cpu", module)) is not None:
            return reason
        if s.bits != 4 or s.act_bits is not None or s.grid != "int":
            return f"int4pack-cpu takes integer W4 weight-only; the scheme is {s.name}"
        if s.group_size not in self.GROUPS:
            return f"int4pack-cpu takes group size 32/64/128; the scheme has {s.group_size}"
        if module.weight_scale.dtype not in self.DTYPES:
            return (
                f"int4pack-cpu is slower than the dense matmul with {module.weight_scale.dtype} activations "
                "on CPU; load in bfloat16 for the low-bit kernel"
            )
        if module.out_features % 16 or module.in_features % (2 * 16 * self.INNER_K_TILES):
            shape = f"{module.out_features}x{module.in_features}"
            return f"int4pack-cpu needs out % 16 == 0 and in % 64 == 0; the layer is {shape}"
        return None

    def prepare(self, module: TLQLinear, codes: torch.Tensor) -> object:
        unsigned = (codes.to(torch.int32) + 8).contiguous()  # kernel computes (u - 8) * scale + zero
        packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, self.INNER_K_TILES)
        scale = module.weight_scale
        zero = torch.zeros_like(scale) if module.scheme.sym else -module.weight_zero_point.to(scale.dtype) * scale
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [groups, out, 2]
        return packed, scales_zeros

    def forward(self, module: TLQLinear, x: torch.Tensor) -> torch.Tensor:
        packed, scales_zeros = module._kernel_state
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(scales_zeros.dtype).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x2, packed, module.scheme.group_size, scales_zeros)
        return y.reshape(*shape[:-1], module.out_features).to(x.dtype)

    def codes(self, module: TLQLinear) -> torch.Tensor:
        """Undo the packing: scatter the stored nibbles back through the layout's inverse, then prove the
        result exact by repacking it (falls back to multiplying the identity through the kernel if not)."""
        packed, scales_zeros = module._kernel_state
        out, cols = module.out_features, module.in_features
        rows = self.BLOCK_ROWS if out % self.BLOCK_ROWS == 0 else out
        source = _inverse_layout(rows, cols, self.INNER_K_TILES)
        unsigned = torch.empty(out // rows, rows * cols, dtype=torch.int32)
        unsigned.scatter_(1, source.expand(out // rows, -1), _nibbles(packed.reshape(out // rows, -1)))
        unsigned = unsigned.view(out, cols)
        if torch.equal(torch._convert_weight_to_int4pack_for_cpu(unsigned, self.INNER_K_TILES), packed):
            return (unsigned - 8).to(torch.int8)
        logger.warning("tlq_hf: int4pack-cpu layout not recognised; recovering codes through the kernel (slow).")
        return self._codes_by_identity(module)

    def _codes_by_identity(self, module: TLQLinear) -> torch.Tensor:
        """Multiply the identity through the kernel with scale 1 and zero 0: the result is ``u - 8`` exactly."""
        packed, scales_zeros = module._kernel_state
        n_groups, out, _ = scales_zeros.shape
        unit = torch.zeros(n_groups, out, 2, dtype=torch.bfloat16)
        unit[..., 0] = 1.0
        rows = []
        for start in range(0, module.in_features, 1024):  # identity in slices: bounded memory
            idx = torch.arange(start, min(start + 1024, module.in_features))
            eye = torch.zeros(len(idx), module.in_features, dtype=torch.bfloat16)
            eye[torch.arange(len(idx)), idx] = 1.0
            rows.append(torch._weight_int4pack_mm_for_cpu(eye, packed, module.scheme.group_size, unit))
        return torch.cat(rows).t().float().round().to(torch.int8).contiguous()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., bytes]`` uint8 -> ``[..., 2 * bytes]`` int32 (low nibble, then high nibble, of each byte)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _inverse_layout(rows: int, cols: int, inner_k_tiles: int) -> torch.Tensor:
    """For each nibble of a packed ``[rows, cols]`` block, the flat index of the weight it holds. Found by
    packing the base-16 digits of every element's own index (the packing places values, it never mixes them);
    ``Int4PackCPU.codes`` repacks its result to prove the layout really is this one."""
    flat = torch.arange(rows * cols, dtype=torch.int64)
    source = torch.zeros(rows * cols, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(rows * cols, 16)))):
        values = ((flat >> (4 * digit)) & 15).to(torch.int32).view(rows, cols)
        packed = torch._convert_weight_to_int4pack_for_cpu(values, inner_k_tiles)
        source |= _nibbles(packed.reshape(-1)).to(torch.int64) << (4 * digit)
    return source.unsqueeze(0)


@KERNELS.register
class IntMMCPU:
    """torch's int8 matmul (``aten._int_mm``) for W8A8, per-channel weight scales, on CPU."""

    name = "int-mm-cpu"

    def unsupported(self, module: TLQLinear) -> str | None:
        s = module.scheme
        if (reason := _cpu_op_missing(self.name, "_int_mm", module)) is not None:
            return reason
        if s.bits != 8 or s.act_bits != 8 or s.grid != "int" or s.act_grid != "int":
            return f"int-mm-cpu takes W8A8 (int8 weights and activations); the scheme is {s.name}"
        if s.group_size != -1 or not s.sym:
            return f"int-mm-cpu needs symmetric per-channel weights (group_size=-1); the scheme is {s.name}"
        return None

    def prepare(self, module: TLQLinear, codes: torch.Tensor) -> object:
        return codes.to(torch.int8).contiguous(), module.weight_scale.float().reshape(1, -1)

    def forward(self, module: TLQLinear, x: torch.Tensor) -> torch.Tensor:
        codes, weight_scale = module._kernel_state
        shape = x.shape
        q, act_scale = quantize_activation(x.reshape(-1, shape[-1]), module.scheme.act_bits)
        acc = torch._int_mm(q.to(torch.int8), codes.t())  # exact int32; the transposed view is the faster GEMV
        y = acc.float().mul_(act_scale.float()).mul_(weight_scale)
        return y.reshape(*shape[:-1], module.out_features).to(x.dtype)

    def codes(self, module: TLQLinear) -> torch.Tensor:
        return module._kernel_state[0]


def select_kernel(module: TLQLinear) -> LinearKernel | None:
    """The first registered kernel that runs ``module``; logs once why none does."""
    reasons = []
    for kernel in KERNELS.values():
        reason = kernel.unsupported(module)
        if reason is None:
            return kernel
        reasons.append(reason)
    message = "; ".join(reasons)
    if message not in _logged:
        _logged.add(message)
        logger.info("tlq_hf: %s layers use dequantize-then-matmul (%s).", module.scheme.name, message)
    return None
