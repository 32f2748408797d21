"""A checkpoint format as one object: what it refuses up front, what it writes, how it is verified and described.

``TLQConfig(save_format=...)`` accepts exactly the names in :data:`FORMATS`; the quantizer (``hf_quantizer``), the
model card (``card``) and the checkpoint verifier (``verify``) ask the format instead of comparing names. A format
registers itself with ``@FORMATS.register`` (one instance per class).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..qtypes import QuantScheme
from ..registry import Registry
from .reload_failures import check_reloadable

__all__ = [
    "FLOATS",
    "FORMATS",
    "SAFETENSORS_DTYPES",
    "CheckpointFormat",
    "TensorSpec",
    "UnsupportedSchemeError",
    "format_of",
    "unsupported",
]

#: safetensors dtype names of a float tensor (scales are stored in the model's dtype)
FLOATS = ("F16", "BF16", "F32")
#: torch dtype -> safetensors dtype name (to compare tensors with a TensorSpec)
SAFETENSORS_DTYPES = {
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


class UnsupportedSchemeError(ValueError):
    """A checkpoint whose quantization config names a scheme tlq_hf does not write."""


def unsupported(where: str, what: str) -> UnsupportedSchemeError:
    """The error for a config entry ``where`` holding ``what``, a scheme tlq_hf does not write."""
    return UnsupportedSchemeError(
        f"{where}: {what} is a scheme tlq_hf does not write, so it cannot vouch for these tensors (transformers "
        "and compressed-tensors may still load it)."
    )


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a packed module as stored: its shape (``None`` where the header alone does not fix it) and
    the safetensors dtype names it may have."""

    shape: tuple[int, ...] | None
    dtypes: tuple[str, ...]

    def accepts(self, shape: tuple[int, ...], dtype: str | None) -> bool:
        """Whether a tensor of ``shape`` and safetensors dtype name ``dtype`` is this one."""
        return (self.shape is None or tuple(shape) == self.shape) and dtype in self.dtypes

    def __str__(self) -> str:
        return f"{self.shape or '(any shape)'} {'/'.join(self.dtypes)}"


class CheckpointFormat(ABC):
    """How a quantized model is stored. Subclasses set the class facts and implement the abstract methods."""

    name: ClassVar[str]  # the TLQConfig(save_format=...) value
    quant_method: ClassVar[str]  # config.json's quantization_config.quant_method
    tag: ClassVar[str]  # the model card's format tag
    needs_plugin: ClassVar[bool]  # whether reloading needs `import tlq_hf`

    def check_config(self, config: Any) -> None:
        """Raise ``ValueError`` for config fields this format cannot store (``TLQConfig.post_init``)."""
        return None

    def check_model(self, model: nn.Module, config: Any) -> None:
        """Raise ``ValueError`` before any weight changes if this model's checkpoint in this format would not
        reload (by default: the architectures transformers itself cannot reload, ``reload_failures``)."""
        check_reloadable(getattr(model.config, "model_type", ""), self.name, FORMATS.names())

    def finish(self, model: nn.Module, config: Any) -> None:
        """After calibration: prepare ``model`` for ``save_pretrained`` (e.g. its ``quantization_config``)."""
        return None

    def state_dict(self, model: nn.Module, config: Any) -> dict[str, torch.Tensor] | None:
        """The tensors to save under in-memory names, or ``None`` for the model's own state dict."""
        return None

    def prepare_load(self, model: nn.Module, config: Any, dtype: torch.dtype, files: list[str]) -> list[str]:
        """Loading a checkpoint of this format through tlq_hf's quantizer: before the weights arrive, put the
        modules that receive them in place (and check ``files``, when known, against them); returns their names.
        A format that transformers loads by itself (``needs_plugin = False``) never gets here; one that needs
        tlq_hf to load must override this and :meth:`check_loaded`."""
        raise TypeError(self._no_loader())

    def check_loaded(self, model: nn.Module, names: list[str]) -> None:
        """After the weights arrived: raise if any module in ``names`` holds missing or insane tensors."""
        raise TypeError(self._no_loader())

    def _no_loader(self) -> str:
        return (
            f"{type(self).__name__} ({self.name!r}) has no loader hooks: its checkpoints are loaded by transformers "
            "itself; a format that needs tlq_hf to load defines prepare_load and check_loaded"
        )

    @abstractmethod
    def scheme_of(self, quantization_config: dict) -> QuantScheme:
        """The scheme a saved ``quantization_config`` describes; raises ``UnsupportedSchemeError`` for one that
        tlq_hf does not write."""

    @abstractmethod
    def module_tensors(self, scheme: QuantScheme, shape: tuple[int, int] | None) -> dict[str, TensorSpec]:
        """The tensors of one packed module of weight ``shape`` (``(out, in)``; ``None``: unknown), by suffix."""

    @abstractmethod
    def usage(self, name: str, scheme: QuantScheme) -> list[str]:
        """The model card's "Use" lines (markdown) for a checkpoint at ``name``."""


#: checkpoint formats by ``save_format`` name
FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format", instantiate=True)


def format_of(quant_method: str | None) -> CheckpointFormat | None:
    """The registered format whose config.json ``quant_method`` is ``quant_method`` (``None`` if none is)."""
    return next((f for f in FORMATS.values() if f.quant_method == quant_method), None)
