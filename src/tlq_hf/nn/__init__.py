"""Packed quantized modules."""

from .quant_linear import TLQLinear, dequant_cache

__all__ = ["TLQLinear", "dequant_cache"]
