"""Calibration: the pipeline that turns a full-precision model into a quantized one."""

from .pipeline import RECIPES, ModuleReport, QuantizationReport, Recipe, quantize_model, resolve_recipe

__all__ = ["RECIPES", "Recipe", "ModuleReport", "QuantizationReport", "quantize_model", "resolve_recipe"]
