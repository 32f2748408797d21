"""Packed quantized modules and their low-bit kernels."""

from .kernels import KERNELS
from .quant_linear import TLQLinear, dequant_cache, prepare_kernels

__all__ = ["KERNELS", "TLQLinear", "dequant_cache", "prepare_kernels"]
