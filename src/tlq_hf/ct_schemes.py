"""Translation between :class:`~tlq_hf.qtypes.QuantScheme` and compressed-tensors' scheme arguments, both ways.

Forward, each weight grid and activation format states its own ``QuantizationArgs`` fields (``Grid.ct_args``,
``ActFormat.ct_args``). Backward (a saved checkpoint's config, or one of compressed-tensors' preset names such as
``NVFP4A16``) is generic: the scheme is the one whose forward translation reproduces the given arguments, so a new
grid or activation format is readable the moment it is registered. Arguments no registered type reproduces are
refused naming the field, never guessed.
"""

from __future__ import annotations

import functools
from typing import Any

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

from .act_formats import ACT_FORMATS
from .grids import GRIDS
from .qtypes import SUPPORTED_WEIGHT_BITS, QuantScheme

__all__ = ["SchemeArgsError", "ct_scheme", "preset_name", "preset_scheme", "scheme_from_ct", "supported_presets"]


class SchemeArgsError(ValueError):
    """compressed-tensors arguments that no scheme tlq_hf writes reproduces; ``field`` names the argument
    (``weights.<key>`` or ``input_activations.<key>``) and ``value`` what it held."""

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.field, self.value = field, value


def ct_scheme(scheme: QuantScheme, targets: list[str] | None = None) -> QuantizationScheme:
    """The compressed-tensors scheme equivalent to ``scheme``."""
    weights = QuantizationArgs(**GRIDS[scheme.grid].ct_args(scheme))
    fmt = scheme.act_format
    acts = None if fmt is None else QuantizationArgs(**fmt.ct_args())
    return QuantizationScheme(targets=targets or ["Linear"], weights=weights, input_activations=acts)


def _normal(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as compressed-tensors itself completes and serialises them (defaults filled, dtypes as strings)."""
    return QuantizationArgs(**args).model_dump(mode="json")


#: the arguments compared, in order: a mismatch early in the list is a worse one
_COMPARED = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "scale_dtype", "block_structure")


def _differs(given: dict[str, Any], ours: dict[str, Any]) -> int | None:
    """Index in :data:`_COMPARED` of the first argument where ``given`` and ``ours`` (both completed by
    compressed-tensors) differ; ``None`` when they agree."""
    want, have = _normal(ours), _normal(given)
    return next((i for i, key in enumerate(_COMPARED) if want.get(key) != have.get(key)), None)


def _closest(given: dict[str, Any], candidates: list[tuple[Any, dict[str, Any]]], where: str) -> Any:
    """The candidate whose arguments equal ``given``; else :class:`SchemeArgsError` naming the argument where the
    closest candidate (the one agreeing longest, in :data:`_COMPARED` order) differs."""
    best, wanted = -1, None
    for candidate, ours in candidates:
        index = _differs(given, ours)
        if index is None:
            return candidate
        if index > best:
            best, wanted = index, _normal(ours)
    key = _COMPARED[max(best, 0)]
    closest = f": the closest scheme tlq_hf writes has {key}={wanted.get(key)!r}" if wanted is not None else ""
    raise SchemeArgsError(f"{where}.{key}", given.get(key), f"{where} {key}={given.get(key)!r}{closest}")


def _weight_scheme_fields(w: dict[str, Any]) -> list[dict[str, Any]]:
    """Candidate scheme fields for weight arguments ``w`` (each grid is then asked whether it reproduces them)."""
    strategy = w.get("strategy")
    if strategy == "channel":
        group_size = -1
    elif strategy in ("group", "tensor_group") and isinstance(w.get("group_size"), int):
        group_size = w["group_size"]
    else:
        raise SchemeArgsError(
            "weights.strategy",
            strategy,
            f"weights strategy {strategy!r}: tlq_hf writes per-channel ('channel') and grouped ('group', "
            "'tensor_group') weight scales",
        )
    if w.get("num_bits") not in SUPPORTED_WEIGHT_BITS:
        raise SchemeArgsError("weights.num_bits", w.get("num_bits"), f"{w.get('num_bits')}-bit weights")
    if w.get("actorder") not in (None, "static"):
        raise SchemeArgsError(
            "weights.actorder", w.get("actorder"), f"weights actorder {w.get('actorder')!r} (needs g_idx)"
        )
    return [
        {"bits": w["num_bits"], "group_size": group_size, "sym": bool(w.get("symmetric", True)), "grid": g}
        for g in GRIDS.names()
    ]


def scheme_from_ct(weights: dict[str, Any], acts: dict[str, Any] | None = None) -> QuantScheme:
    """The :class:`QuantScheme` whose compressed-tensors arguments are ``weights`` / ``acts`` (``input_activations``);
    raises :class:`SchemeArgsError` naming the first argument (``weights.<key>`` / ``input_activations.<key>``) where
    the closest registered grid or activation format differs."""
    weights = {k: v for k, v in weights.items() if v is not None}
    candidates = []
    for fields in _weight_scheme_fields(weights):
        try:
            candidate = QuantScheme(**fields)
        except ValueError:
            continue  # this grid does not take these bits / group size / symmetry
        candidates.append((candidate, GRIDS[candidate.grid].ct_args(candidate)))
    scheme = _closest(weights, candidates, "weights")
    if acts is None:
        return scheme
    acts = {k: v for k, v in acts.items() if v is not None}
    fmt = _closest(acts, [(f, f.ct_args()) for f in ACT_FORMATS.values()], "input_activations")
    return QuantScheme(scheme.bits, scheme.group_size, scheme.sym, fmt.bits, scheme.grid, fmt.name)


def _preset_args(name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    preset = PRESET_SCHEMES[name]
    weights = preset.get("weights")
    acts = preset.get("input_activations")
    dump = lambda a: None if a is None else a.model_dump(exclude_none=True)  # noqa: E731
    return dump(weights), dump(acts)


@functools.cache
def _presets() -> dict[str, QuantScheme | str]:
    """compressed-tensors' preset names -> the scheme, or why tlq_hf does not write it."""
    out: dict[str, QuantScheme | str] = {}
    for name in PRESET_SCHEMES:
        weights, acts = _preset_args(name)
        if weights is None:
            out[name] = "it quantizes nothing"
            continue
        try:
            out[name] = scheme_from_ct(weights, acts)
        except (SchemeArgsError, ValueError) as err:
            out[name] = str(err)
    return out


def supported_presets() -> tuple[str, ...]:
    """The compressed-tensors preset names tlq_hf writes, in compressed-tensors' order (``TLQConfig(scheme=...)`` and
    ``--scheme`` accept these)."""
    return tuple(n for n, s in _presets().items() if isinstance(s, QuantScheme))


def preset_scheme(name: str) -> QuantScheme:
    """The scheme of compressed-tensors preset ``name`` (``"NVFP4A16"``, ``"FP8_DYNAMIC"``, ...)."""
    presets = _presets()
    if name not in presets:
        raise ValueError(f"scheme={name!r} is not a compressed-tensors preset: use one of {supported_presets()}.")
    found = presets[name]
    if not isinstance(found, QuantScheme):
        raise ValueError(
            f"scheme={name!r} is a compressed-tensors preset tlq_hf does not write ({found}); use one of "
            f"{supported_presets()}."
        )
    return found


def preset_name(scheme: QuantScheme) -> str | None:
    """The first compressed-tensors preset whose scheme is ``scheme`` (``None`` if none is)."""
    return next((n for n, s in _presets().items() if s == scheme), None)
