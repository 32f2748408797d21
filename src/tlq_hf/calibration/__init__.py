"""Calibration: the pipeline that turns a full-precision model into a quantized one."""

from .pipeline import METHODS, ModuleReport, QuantizationReport, quantize_model

__all__ = ["METHODS", "ModuleReport", "QuantizationReport", "quantize_model"]
