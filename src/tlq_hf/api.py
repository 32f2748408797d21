"""Quantizing a model that is already loaded, and the optimum ``OptimumQuantizer`` entry point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .config import TLQConfig
from .hf_quantizer import TLQHfQuantizer

__all__ = ["quantize", "TLQQuantizer"]


def quantize(model: nn.Module, config: TLQConfig) -> nn.Module:
    """Quantize an already-loaded full-precision transformers model in place and return it.

    Afterwards the model behaves exactly like one quantized through ``from_pretrained(...,
    quantization_config=config)``: ``save_pretrained`` writes the configured format. If quantization fails or
    is interrupted (``KeyboardInterrupt``), the model is put back as it was before the error is re-raised.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already quantized ({model.hf_quantizer.quantization_config.quant_method}); "
            "quantize the full-precision model instead."
        )
    hf_quantizer = TLQHfQuantizer(config, pre_quantized=False)
    hf_quantizer.undo_on_failure = True
    before = {k: model.__dict__[k] for k in _MARKS if k in model.__dict__}
    had_config = hasattr(model.config, "quantization_config")
    model.config.quantization_config = config
    model.hf_quantizer = hf_quantizer
    try:
        model.quantization_method = config.quant_method
        model.is_quantized = True
    except AttributeError:  # transformers 5: is_quantized is a read-only property derived from hf_quantizer
        pass
    try:
        hf_quantizer.postprocess_model(model)
    except BaseException:  # the modules are already put back; undo the marks too: a plain model again
        for key in _MARKS:
            model.__dict__.pop(key, None)
        model.__dict__.update(before)
        if not had_config:
            del model.config.quantization_config
        raise
    return model


#: Instance attributes ``quantize`` sets on the model (removed again if quantization fails).
_MARKS = ("hf_quantizer", "quantization_method", "is_quantized", "save_pretrained", "push_to_hub", "tlq_report")


class TLQQuantizer(OptimumQuantizer):
    """optimum-style quantizer: ``TLQQuantizer.from_pretrained(model_or_path).quantize(save_dir)``."""

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(cls, model_or_path: nn.Module | str | os.PathLike, file_name: str | None = None, **kwargs: Any):
        """Wrap a loaded model, or load a full-precision one (and its processor) from a path or Hub id."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path)
        if file_name is not None:
            raise ValueError("TLQQuantizer.from_pretrained loads a model folder or Hub id; file_name is not used.")
        from transformers import AutoProcessor

        from .arch import load_auto_class

        model = load_auto_class().from_pretrained(model_or_path, **kwargs)
        try:
            processor = AutoProcessor.from_pretrained(model_or_path)
        except (OSError, ValueError):
            processor = None
        return cls(model, processor)

    def quantize(
        self,
        save_dir: str | os.PathLike,
        file_prefix: str | None = None,
        config: TLQConfig | None = None,
        **kwargs: Any,
    ) -> Path:
        """Quantize the wrapped model (default ``TLQConfig()``), save it and its processor to ``save_dir``."""
        if file_prefix is not None:
            raise ValueError("TLQQuantizer.quantize writes a transformers folder; file_prefix is not used.")
        quantize(self.model, config or TLQConfig(**kwargs))
        save_dir = Path(save_dir)
        self.model.save_pretrained(save_dir)
        if self.processor is not None:
            self.processor.save_pretrained(save_dir)
        return save_dir
