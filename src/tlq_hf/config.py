"""``TLQConfig``: the one object a user passes to ``from_pretrained(..., quantization_config=...)``."""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .qtypes import SUPPORTED_ACT_BITS, SUPPORTED_WEIGHT_BITS, QuantScheme
from .version import __version__

__all__ = ["TLQConfig", "IMPLEMENTED_METHODS", "PLANNED_METHODS", "SAVE_FORMATS"]

logger = logging.getLogger(__name__)

IMPLEMENTED_METHODS = ("rtn",)
PLANNED_METHODS = ("tlq", "gptq", "awq", "mbq", "smoothquant")
SAVE_FORMATS = ("compressed-tensors", "tlq")

_SERIALIZED = ("bits", "group_size", "sym", "act_bits", "method", "ignore", "save_format")


class TLQConfig(QuantizationConfigMixin):
    """Configuration of TLQ quantization.

    Args:
        bits: weight bits, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale (a divisor of every quantized layer's
            ``in_features``), or -1 for one scale per output channel.
        sym: symmetric (zero point 0) or asymmetric weight quantization.
        act_bits: ``None`` for weight-only, or 8 for dynamic per-token int8 activations (W8A8, W4A8).
        method: calibration method; ``"rtn"`` (round-to-nearest) in this version.
        ignore: regexes (an optional ``re:`` prefix is accepted) of module names to keep in full
            precision. ``None`` (default) quantizes exactly the linear layers of the language-model
            decoder, keeping the vision tower, the projector and ``lm_head`` in full precision.
            With a list, every ``nn.Linear`` not matched is quantized.
        save_format: ``"compressed-tensors"`` (default; reloads without tlq_hf, loads in vLLM) or
            ``"tlq"`` (native packed modules, reloads only with ``import tlq_hf``).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        act_bits: int | None = None,
        method: str = "rtn",
        ignore: list[str] | None = None,
        save_format: str = "compressed-tensors",
        **kwargs: Any,
    ) -> None:
        self.quant_method = "tlq"
        kwargs.pop("quant_method", None)
        self.tlq_version = kwargs.pop("tlq_version", __version__)
        if kwargs:
            raise TypeError(
                f"TLQConfig got unknown argument(s) {sorted(kwargs)}; valid ones are {list(_SERIALIZED)}."
            )
        self.bits, self.group_size, self.sym, self.act_bits = bits, group_size, sym, act_bits
        self.method, self.ignore, self.save_format = method, ignore, save_format
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors say how to fix the value."""
        if self.bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"TLQConfig(bits={self.bits!r}): use one of {SUPPORTED_WEIGHT_BITS}.")
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise ValueError(
                f"TLQConfig(act_bits={self.act_bits!r}): use None (weight-only) or 8 (dynamic per-token int8)."
            )
        if not isinstance(self.sym, bool):
            raise ValueError(f"TLQConfig(sym={self.sym!r}): use True or False.")
        self.scheme  # validates group_size  # noqa: B018
        if self.method in PLANNED_METHODS:
            raise ValueError(
                f"TLQConfig(method={self.method!r}) is not available in tlq_hf {__version__} yet; "
                f"use one of {IMPLEMENTED_METHODS}."
            )
        if self.method not in IMPLEMENTED_METHODS:
            raise ValueError(f"TLQConfig(method={self.method!r}) is unknown; use one of {IMPLEMENTED_METHODS}.")
        if self.save_format not in SAVE_FORMATS:
            raise ValueError(f"TLQConfig(save_format={self.save_format!r}): use one of {SAVE_FORMATS}.")
        if not self.sym and self.save_format == "compressed-tensors":
            raise ValueError(
                "TLQConfig(sym=False) cannot be saved as compressed-tensors: transformers (4.57 and 5.x) fails to "
                "reload asymmetric pack-quantized checkpoints (its loader expects an unpacked zero point, "
                "the format packs it). Use sym=True, or save_format='tlq' for asymmetric weights."
            )
        if self.ignore is not None:
            if isinstance(self.ignore, str) or not all(isinstance(p, str) for p in self.ignore):
                raise ValueError("TLQConfig(ignore=...) must be a list of regex strings, e.g. ['re:.*visual.*'].")
            self.ignore = list(self.ignore)
            for pattern in self.ignore:
                try:
                    re.compile(pattern.removeprefix("re:"))
                except re.error as err:
                    raise ValueError(f"TLQConfig(ignore=...): {pattern!r} is not a valid regex ({err}).") from err

    @property
    def scheme(self) -> QuantScheme:
        """The weight/activation scheme these fields describe."""
        return QuantScheme(bits=self.bits, group_size=self.group_size, sym=self.sym, act_bits=self.act_bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields only (what goes into ``config.json``)."""
        out = {"quant_method": "tlq", "tlq_version": self.tlq_version}
        out.update({k: getattr(self, k) for k in _SERIALIZED})
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a ``config.json`` dict; keys this version does not know are dropped with a warning."""
        known = {k: v for k, v in config_dict.items() if k in _SERIALIZED + ("tlq_version",)}
        unknown = sorted(set(config_dict) - set(known) - {"quant_method"})
        if unknown:
            logger.warning("TLQConfig.from_dict: ignoring keys unknown to tlq_hf %s: %s", __version__, unknown)
        config = cls(**known)
        unused = {}
        for key, value in kwargs.items():
            if key in _SERIALIZED:
                setattr(config, key, value)
            else:
                unused[key] = value
        config.post_init()
        return (config, unused) if return_unused_kwargs else config
