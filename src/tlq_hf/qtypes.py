"""Quantization schemes: what a quantized weight (and activation) looks like, nothing about how it is found.

``grid`` names the values a weight element takes (:mod:`tlq_hf.grids`: ``"int"`` by default, ``"fp8"``,
``"nvfp4"``, ``"mxfp4"``); the integer convention below is the ``"int"`` grid's. ``act_bits`` with ``act_grid``
names the dynamic activation format (:mod:`tlq_hf.act_formats`: ``"int"`` per-token int8 by default, ``"fp8"``
per-token FP8, ``"nvfp4"`` group-16 FP4 with a calibrated global scale).

Integer convention (shared with compressed-tensors, so checkpoints need no conversion):
codes are signed, ``q in [-2**(b-1), 2**(b-1) - 1]``; the zero point is a signed value in the same range
(0 for symmetric schemes); ``w ~= (q - zero) * scale``, one ``scale``/``zero`` per output row and group of
``group_size`` consecutive input columns (``group_size == -1``: one group spanning the row, per-channel).
"""

from __future__ import annotations

from dataclasses import dataclass

from .act_formats import ACT_FORMATS
from .grids import GRIDS

__all__ = ["QuantScheme", "SUPPORTED_WEIGHT_BITS", "SUPPORTED_ACT_BITS"]

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 8)
SUPPORTED_ACT_BITS = (None, 4, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Weight (and optional dynamic activation) quantization scheme of one linear layer."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_bits: int | None = None
    grid: str = "int"
    act_grid: str = "int"

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r} is not a weight grid: use one of {GRIDS.names()}.")
        GRIDS[self.grid].check(self)
        if self.act_grid not in ACT_FORMATS:
            raise ValueError(
                f"act_grid={self.act_grid!r} is not an activation format: use one of {ACT_FORMATS.names()}."
            )
        if self.act_bits is None and self.act_grid != "int":
            raise ValueError(
                f"act_grid={self.act_grid!r} with act_bits=None: set act_bits={ACT_FORMATS[self.act_grid].bits} to "
                f"quantize activations as {self.act_grid}, or leave act_grid at 'int' for weight-only."
            )
        if self.act_bits is not None and self.act_bits in SUPPORTED_ACT_BITS:
            fmt = ACT_FORMATS[self.act_grid]
            if fmt.bits != self.act_bits:
                fits = [f.name for f in ACT_FORMATS.values() if f.bits == self.act_bits]
                raise ValueError(
                    f"act_bits={self.act_bits} does not fit act_grid={self.act_grid!r} ({fmt.bits}-bit activations): "
                    f"use act_bits={fmt.bits}" + (f", or act_grid one of {fits}" if fits else "") + "."
                )
        if self.bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported: use one of {SUPPORTED_WEIGHT_BITS}.")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise ValueError(
                f"group_size={self.group_size!r} is invalid: use a positive integer such as 128 "
                "(a divisor of every quantized layer's in_features) or -1 for one scale per output channel."
            )
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise ValueError(
                f"act_bits={self.act_bits!r} is not supported: use None (weight-only), 8 (dynamic per-token int8, or "
                "FP8 with act_grid='fp8') or 4 (NVFP4 with act_grid='nvfp4')."
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
    def act_format(self):
        """The :class:`~tlq_hf.act_formats.ActFormat` of the activations (``None``: weight-only)."""
        return None if self.act_bits is None else ACT_FORMATS[self.act_grid]

    @property
    def calibrated_activations(self) -> bool:
        """Whether the activations are quantized under a global scale calibrated on data (NVFP4 activations): the
        run then needs calibration rows whatever the method, and each packed layer stores ``input_global_scale``."""
        return self.act_format is not None and self.act_format.has_global_scale

    @property
    def description(self) -> str:
        """The scheme in words, e.g. ``4-bit symmetric integer weights in groups of 128, ...; 16-bit activations``."""
        act = "16-bit activations" if self.act_format is None else self.act_format.description
        return f"{GRIDS[self.grid].describe(self)}; {act}"

    @property
    def name(self) -> str:
        """Short human name: ``W4A16-g128`` or ``W8A8`` for integer schemes, compressed-tensors' preset name for
        a float scheme that is one (``NVFP4A16``, ``FP8_DYNAMIC``), else e.g. ``FP8A16-g128``."""
        if self.grid == "int" and self.act_grid == "int":
            act = self.act_bits or 16
            group = "" if self.group_size == -1 else f"-g{self.group_size}"
            return f"W{self.bits}A{act}{group}{'' if self.sym else '-asym'}"
        from .ct_schemes import preset_name  # the presets are compressed-tensors', read when first needed

        preset = preset_name(self)
        if preset is not None:
            return preset
        weights = f"W{self.bits}" if self.grid == "int" else self.grid.upper()
        act = "A16" if self.act_format is None else self.act_format.label
        fixed = getattr(GRIDS[self.grid], "group_size", None) is not None  # NVFP4's 16, MXFP4's 32: in the name
        group = "" if self.group_size == -1 or fixed else f"-g{self.group_size}"
        return f"{weights}{act}{group}"


def _largest_pow2_divisor(n: int, below: int) -> int:
    g = 1
    while g * 2 <= below and n % (g * 2) == 0:
        g *= 2
    return g
