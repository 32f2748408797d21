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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .quant_linear import TLQLinear

__all__ = ["LinearKernel", "Int4PackCPU", "KERNELS", "select_kernel"]

logger = logging.getLogger("tlq_hf")
_logged: set[str] = set()


class LinearKernel(Protocol):
    """What a kernel provides. State it needs lives on the module (``module._kernel_state``)."""

    name: str

    def unsupported(self, module: TLQLinear) -> str | None:
        """Why this kernel cannot run ``module`` (``None`` when it can)."""

    def prepare(self, module: TLQLinear, codes: torch.Tensor) -> object:
        """Build the kernel's state from the module's signed int8 ``codes [out, in]`` and qparams."""

    def forward(self, module: TLQLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` (no bias) with the module's weight, from the prepared state."""

    def codes(self, module: TLQLinear) -> torch.Tensor:
        """The signed int8 codes, recovered exactly from the prepared state (for saving)."""


class Int4PackCPU:
    """torch's CPU int4 weight-packed matmul (``aten._weight_int4pack_mm_for_cpu``)."""

    name = "int4pack-cpu"
    GROUPS = (32, 64, 128)
    DTYPES = (torch.bfloat16, torch.float16)
    INNER_K_TILES = 2

    def unsupported(self, module: TLQLinear) -> str | None:
        s = module.scheme
        if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no _weight_int4pack_mm_for_cpu"
        if module.weight_scale.device.type != "cpu":
            return f"int4pack-cpu runs on CPU; the layer is on {module.weight_scale.device.type}"
        if s.bits != 4 or s.act_bits is not None:
            return f"int4pack-cpu takes W4 weight-only; the scheme is {s.name}"
        if s.group_size not in self.GROUPS:
            return f"int4pack-cpu takes group size 32/64/128; the scheme has {s.group_size}"
        if module.weight_scale.dtype not in self.DTYPES:
            return (
                f"int4pack-cpu is slower than the dense matmul with {module.weight_scale.dtype} activations "
                "on CPU; load in bfloat16 for the low-bit kernel"
            )
        if module.out_features % 8 or module.in_features % (2 * 16 * self.INNER_K_TILES):
            shape = f"{module.out_features}x{module.in_features}"
            return f"int4pack-cpu needs out % 8 == 0 and in % 64 == 0; the layer is {shape}"
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
        """Multiply the identity through the kernel with scale 1 and zero 0: the result is ``u - 8`` exactly."""
        packed, scales_zeros = module._kernel_state
        n_groups, out, _ = scales_zeros.shape
        unit = torch.zeros(n_groups, out, 2, dtype=torch.float32)
        unit[..., 0] = 1.0
        rows = []
        for start in range(0, module.in_features, 1024):  # identity in slices: bounded memory
            idx = torch.arange(start, min(start + 1024, module.in_features))
            eye = torch.zeros(len(idx), module.in_features, dtype=torch.float32)
            eye[torch.arange(len(idx)), idx] = 1.0
            rows.append(torch._weight_int4pack_mm_for_cpu(eye, packed, module.scheme.group_size, unit))
        return torch.cat(rows).t().round().to(torch.int8).contiguous()


KERNELS: list[LinearKernel] = [Int4PackCPU()]


def select_kernel(module: TLQLinear) -> LinearKernel | None:
    """The first registered kernel that runs ``module``; logs once why none does."""
    reasons = []
    for kernel in KERNELS:
        reason = kernel.unsupported(module)
        if reason is None:
            return kernel
        reasons.append(reason)
    message = "; ".join(reasons)
    if message not in _logged:
        _logged.add(message)
        logger.info("tlq_hf: %s layers use dequantize-then-matmul (%s).", module.scheme.name, message)
    return None
