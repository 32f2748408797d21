"""Packed quantized modules."""

from .quant_linear import TLQLinear

__all__ = ["TLQLinear"]
