"""Check a saved checkpoint folder before sharing or serving it: ``python -m tlq_hf verify DIR``.

Reads ``config.json`` and the safetensors headers (plus the small scale tensors), never the whole model:

* the quantization config names a scheme tlq_hf writes (integer weights of 2/3/4/8 bits, group or channel
  scales, optional dynamic per-token int8 activations) — another scheme is refused naming the config entry,
  since nothing here could vouch for its tensors;
* every quantized module has all its tensors, with the shapes and dtypes the scheme implies, and finite
  scales — a problem is reported naming the tensor;
* every file is a complete safetensors file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..qtypes import SUPPORTED_WEIGHT_BITS, QuantScheme
from .native import CorruptCheckpointError, checkpoint_specs

__all__ = ["UnsupportedSchemeError", "VerifiedCheckpoint", "verify_checkpoint"]

_FLOATS = ("F16", "BF16", "F32")


class UnsupportedSchemeError(ValueError):
    """A checkpoint whose quantization config names a scheme tlq_hf does not write."""


@dataclass
class VerifiedCheckpoint:
    """What :func:`verify_checkpoint` found: the format, the scheme and how many quantized modules."""

    quant_method: str
    scheme: str
    modules: int
    files: int


def _files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CorruptCheckpointError(f"{folder}: no safetensors weights (model.safetensors or an index).")
    return files


def _unsupported(where: str, what: str) -> UnsupportedSchemeError:
    return UnsupportedSchemeError(
        f"{where}: {what} is a scheme tlq_hf does not write, so it cannot vouch for these tensors (transformers "
        "and compressed-tensors may still load it)."
    )


def _ct_scheme(qc: dict) -> tuple[QuantScheme, str]:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _unsupported("quantization_config.config_groups", f"{len(groups)} groups")
    ((name, group),) = groups.items()
    where = f"quantization_config.config_groups.{name}"
    w = group.get("weights") or {}
    checks = {
        "type": w.get("type") == "int",
        "num_bits": w.get("num_bits") in SUPPORTED_WEIGHT_BITS,
        "strategy": w.get("strategy") in ("group", "channel"),
        "dynamic": w.get("dynamic") is False,
        "actorder": w.get("actorder") in (None, "static"),
        "symmetric": isinstance(w.get("symmetric"), bool),
    }
    for field, ok in checks.items():
        if not ok:
            raise _unsupported(f"{where}.weights.{field}", repr(w.get(field)))
    acts = group.get("input_activations")
    act_bits = None
    if acts is not None:
        wanted = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
        for field, value in wanted.items():
            if acts.get(field) != value:
                raise _unsupported(f"{where}.input_activations.{field}", repr(acts.get(field)))
        act_bits = 8
    group_size = w["group_size"] if w["strategy"] == "group" else -1
    scheme = QuantScheme(bits=w["num_bits"], group_size=group_size, sym=w["symmetric"], act_bits=act_bits)
    from .compressed_tensors import ct_format

    if qc.get("format") != ct_format(scheme):
        raise _unsupported("quantization_config.format", f"{qc.get('format')!r} for {scheme.name}")
    return scheme, ct_format(scheme)


def _expect(problems: list[str], key: str, spec: tuple | None, shape: tuple | None, dtypes: tuple[str, ...]) -> None:
    if spec is None:
        problems.append(f"{key}: missing")
    elif (shape is not None and spec[0] != shape) or spec[1] not in dtypes:
        problems.append(f"{key}: {spec[0]} {spec[1]}, expected {shape or '(any shape)'} {'/'.join(dtypes)}")


def _check_module(prefix: str, specs: dict, scheme: QuantScheme, fmt: str, shape: tuple[int, int] | None) -> list[str]:
    """Problems with one quantized module's tensors (``shape``: ``(out, in)`` where the checkpoint states it)."""
    problems: list[str] = []
    scale = specs[f"{prefix}.weight_scale"]
    out = scale[0][0] if len(scale[0]) == 2 else None
    if shape is None and out is not None and scheme.group_size != -1:
        shape = (out, scale[0][1] * scheme.group_size)
    groups = scheme.groups(shape[1]) if shape else None
    _expect(problems, f"{prefix}.weight_scale", scale, (shape[0], groups) if shape else None, _FLOATS)
    if fmt == "int-quantized":
        _expect(problems, f"{prefix}.weight", specs.get(f"{prefix}.weight"), shape, ("I8",))
    else:
        packed = (shape[0], math.ceil(shape[1] * scheme.bits / 32)) if shape else None
        _expect(problems, f"{prefix}.weight_packed", specs.get(f"{prefix}.weight_packed"), packed, ("I32",))
    if not scheme.sym:
        zero_shape = None
        if shape and fmt == "native":
            zero_shape = (shape[0], groups)
        elif shape:
            zero_shape = (math.ceil(shape[0] * scheme.bits / 32), groups)
        dtypes = ("I8",) if fmt == "native" else ("I32",)
        _expect(problems, f"{prefix}.weight_zero_point", specs.get(f"{prefix}.weight_zero_point"), zero_shape, dtypes)
    return problems


def verify_checkpoint(folder: str | os.PathLike) -> VerifiedCheckpoint:
    """Check ``folder`` as described in the module docstring; raise naming the first problems found."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CorruptCheckpointError(f"{folder}: no config.json; not a transformers checkpoint folder.")
    qc: dict[str, Any] = json.loads(config_path.read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        scheme, fmt = _ct_scheme(qc)
    elif method == "tlq":
        from ..config import TLQConfig

        scheme, fmt = TLQConfig.from_dict(qc).scheme, "native"
    else:
        raise _unsupported("quantization_config.quant_method", repr(method))
    files = _files(folder)
    specs = checkpoint_specs([str(f) for f in files])
    prefixes = sorted(k.removesuffix(".weight_scale") for k in specs if k.endswith(".weight_scale"))
    if not prefixes:
        raise CorruptCheckpointError(f"{folder}: the config says {scheme.name}, but no tensor has a weight_scale.")
    problems: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for prefix in (p for p in prefixes if f"{p}.weight_scale" in keys):
                shape = None
                if f"{prefix}.weight_shape" in keys:
                    shape = tuple(int(v) for v in f.get_tensor(f"{prefix}.weight_shape").tolist())
                problems += _check_module(prefix, specs, scheme, fmt, shape)
                scale = f.get_tensor(f"{prefix}.weight_scale")
                if not torch.isfinite(scale.float()).all():
                    problems.append(f"{prefix}.weight_scale: non-finite values")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CorruptCheckpointError(f"{folder} ({scheme.name}, {method}):\n  {shown}")
    return VerifiedCheckpoint(method, scheme.name, len(prefixes), len(files))
