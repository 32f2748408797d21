"""Calibration: the pipeline that turns a full-precision model into a quantized one.

The pipeline's names are loaded on first use, so that light modules of this package (``importance_kinds``,
read by ``TLQConfig``) import without the whole pipeline.
"""

from typing import Any

__all__ = ["ModuleReport", "QuantizationReport", "quantize_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
