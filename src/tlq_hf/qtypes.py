"""Quantization schemes: what a quantized weight (and activation) looks like, nothing about how it is found.

``grid`` names the values a weight element takes (:mod:`tlq_hf.grids`: ``"int"`` by default, ``"fp8"``,
``"nvfp4"``, ``"mxfp4"``); the integer convention below is the ``"int"`` grid's.

Integer convention (shared with compressed-tensors, so checkpoints need no conversion):
codes are signed, ``q in [-2**(b-1), 2**(b-1) - 1]``; the zero point is a signed value in the same range
(0 for symmetric schemes); ``w ~= (q - zero) * scale``, one ``scale``/``zero`` per output row and group of
``group_size`` consecutive input columns (``group_size == -1``: one group spanning the row, per-channel).
"""

from __future__ import annotations

from dataclasses import dataclass

from .grids import GRIDS

__all__ = ["QuantScheme", "SUPPORTED_WEIGHT_BITS", "SUPPORTED_ACT_BITS"]

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 8)
SUPPORTED_ACT_BITS = (None, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Weight (and optional dynamic activation) quantization scheme of one linear layer."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_bits: int | None = None
    grid: str = "int"

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r} is not a weight grid: use one of {GRIDS.names()}.")
        GRIDS[self.grid].check(self)
        if self.bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported: use one of {SUPPORTED_WEIGHT_BITS}.")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise ValueError(
                f"group_size={self.group_size!r} is invalid: use a positive integer such as 128 "
                "(a divisor of every quantized layer's in_features) or -1 for one scale per output channel."
            )
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise ValueError(
                f"act_bits={self.act_bits!r} is not supported: use None (weight-only) or 8 "
                "(dynamic per-token int8 activations)."
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        """Number of quantization groups along a row of ``in_features`` columns."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_in_features(self, in_features: int, name: str = "layer") -> None:
        """Raise if ``in_features`` cannot be split into whole groups."""
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(
                f"{name}: in_features={in_features} is not divisible by group_size={self.group_size}. "
                f"Pick a group_size that divides it (e.g. {_largest_pow2_divisor(in_features, self.group_size)}), "
                "use group_size=-1 (per-channel), or add the module to `ignore`."
            )

    @property
    def name(self) -> str:
        """Short human name, e.g. ``W4A16-g128`` or ``W8A8``."""
        act = self.act_bits or 16
        group = "" if self.group_size == -1 else f"-g{self.group_size}"
        return f"W{self.bits}A{act}{group}{'' if self.sym else '-asym'}"


def _largest_pow2_divisor(n: int, below: int) -> int:
    g = 1
    while g * 2 <= below and n % (g * 2) == 0:
        g *= 2
    return g
