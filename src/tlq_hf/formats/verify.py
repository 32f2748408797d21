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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..qtypes import QuantScheme
from .base import CheckpointFormat, TensorSpec, UnsupportedSchemeError, format_of, unsupported
from .native import CorruptCheckpointError, checkpoint_specs

__all__ = ["UnsupportedSchemeError", "VerifiedCheckpoint", "verify_checkpoint"]


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


def _expect(problems: list[str], key: str, spec: tuple | None, want: TensorSpec) -> None:
    if spec is None:
        problems.append(f"{key}: missing")
    elif not want.accepts(*spec):
        problems.append(f"{key}: {spec[0]} {spec[1]}, expected {want}")


def _check_module(
    prefix: str, specs: dict, scheme: QuantScheme, fmt: CheckpointFormat, shape: tuple[int, int] | None
) -> list[str]:
    """Problems with one quantized module's tensors (``shape``: ``(out, in)`` where the checkpoint states it, else
    read off a grouped scale)."""
    problems: list[str] = []
    scale = specs[f"{prefix}.weight_scale"]
    if shape is None and len(scale[0]) == 2 and scheme.group_size != -1:
        shape = (scale[0][0], scale[0][1] * scheme.group_size)
    for suffix, want in fmt.module_tensors(scheme, shape).items():
        _expect(problems, f"{prefix}.{suffix}", specs.get(f"{prefix}.{suffix}"), want)
    return problems


def verify_checkpoint(folder: str | os.PathLike) -> VerifiedCheckpoint:
    """Check ``folder`` as described in the module docstring; raise naming the first problems found."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CorruptCheckpointError(f"{folder}: no config.json; not a transformers checkpoint folder.")
    qc: dict[str, Any] = json.loads(config_path.read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    fmt = format_of(method)
    if fmt is None:
        raise unsupported("quantization_config.quant_method", repr(method))
    scheme = fmt.scheme_of(qc)
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
