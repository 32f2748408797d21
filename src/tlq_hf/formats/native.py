"""The native ``tlq`` format: :class:`TLQLinear` buffers saved under their own names.

Loading: before the weights arrive, target linears are swapped for empty ``TLQLinear`` modules (on
whatever device the skeleton lives, usually ``meta``); transformers then fills their buffers. Afterwards
every packed module is validated: buffers present, shapes and dtypes right, scales finite and non-zero.
:class:`NativeFormat` is the registered ``save_format="tlq"``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import select_quant_targets, swap_module
from ..experts import unfuse_experts
from ..grids import finite_scales, grid_of
from ..nn import TLQLinear
from ..qtypes import QuantScheme
from .base import FLOATS, FORMATS, SAFETENSORS_DTYPES, CheckpointFormat, TensorSpec

__all__ = [
    "NATIVE_BUFFERS",
    "NativeFormat",
    "swap_in_packed_modules",
    "validate_checkpoint",
    "validate_packed_modules",
    "CorruptCheckpointError",
]

logger = logging.getLogger(__name__)

NATIVE_BUFFERS = ("weight_packed", "weight_scale", "weight_global_scale", "weight_zero_point", "input_global_scale")


class CorruptCheckpointError(ValueError):
    """A ``tlq`` checkpoint whose packed tensors are missing, mis-shaped or non-finite."""


def swap_in_packed_modules(
    model: nn.Module, scheme: QuantScheme, ignore: list[str] | None, dtype: torch.dtype
) -> list[str]:
    """Replace target ``nn.Linear`` modules by empty :class:`TLQLinear` (fused MoE experts first become
    per-expert linears, as when the checkpoint was quantized); return their names."""
    unfuse_experts(model, "", lambda name, module: swap_module(model, name, module), copy_weights=False)
    targets = select_quant_targets(model, ignore)
    for name, linear in targets.items():
        device = linear.weight.device
        with torch.device(device):
            new = TLQLinear(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None, dtype=dtype)
        swap_module(model, name, new)
    return list(targets)


@FORMATS.register
class NativeFormat(CheckpointFormat):
    """tlq_hf's own packed buffers (``quant_method: "tlq"``): any scheme tlq_hf writes, asymmetric and
    activation-quantized MoE included; reloads with ``import tlq_hf``, keeping the weights packed in memory."""

    name = "tlq"
    quant_method = "tlq"
    tag = "tlq-native"
    needs_plugin = True

    def prepare_load(self, model: nn.Module, config, dtype: torch.dtype, files: list[str]) -> list[str]:
        names = swap_in_packed_modules(model, config.scheme, config.ignore, dtype=dtype)
        if files:
            validate_checkpoint(files, model, names)
        else:
            logger.warning("tlq_hf: could not locate the checkpoint files to validate before loading.")
        return names

    def check_loaded(self, model: nn.Module, names: list[str]) -> None:
        validate_packed_modules(model, names)
        _warn_cast_global_scales(model, names)

    def scheme_of(self, quantization_config: dict) -> QuantScheme:
        from ..config import TLQConfig  # the config module reads FORMATS: imported when first needed

        return TLQConfig.from_dict(quantization_config).scheme

    def module_tensors(self, scheme: QuantScheme, shape: tuple[int, int] | None) -> dict[str, TensorSpec]:
        grid = grid_of(scheme)
        groups = (shape[0], scheme.groups(shape[1])) if shape else None
        packed_dtype = grid.storage((1, 2), scheme)[1]  # the dtype does not depend on the shape
        scale_dtype = grid.stored_scale_dtype(torch.float32)
        specs = {
            "weight_packed": TensorSpec(
                grid.storage(shape, scheme)[0] if shape else None, (SAFETENSORS_DTYPES[packed_dtype],)
            ),
            "weight_scale": TensorSpec(
                groups, FLOATS if scale_dtype == torch.float32 else (SAFETENSORS_DTYPES[scale_dtype],)
            ),
        }
        # float32 on disk; loaded in the model's dtype by transformers 4.57, which casts every float tensor
        if grid.has_global_scale:
            specs["weight_global_scale"] = TensorSpec((1,), FLOATS)
        if scheme.calibrated_activations:
            specs["input_global_scale"] = TensorSpec((1,), FLOATS)
        if not scheme.sym:
            specs["weight_zero_point"] = TensorSpec(groups, ("I8",))
        return specs

    def usage(self, name: str, scheme: QuantScheme) -> list[str]:
        return [
            "Native tlq format: import tlq_hf first (it registers the `tlq` quantization method; without it "
            "transformers cannot read the packed weights):",
            "",
            "```python",
            "import tlq_hf  # noqa: F401",
            "from transformers import AutoModelForImageTextToText",
            f'model = AutoModelForImageTextToText.from_pretrained("{name}")',
            "```",
        ]


def _expected(module: TLQLinear) -> dict[str, TensorSpec]:
    return FORMATS["tlq"].module_tensors(module.scheme, (module.out_features, module.in_features))


def checkpoint_specs(files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, safetensors dtype)}`` of every tensor in ``files``, from their headers only."""
    from safetensors import safe_open

    specs = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    specs[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as err:  # safetensors raises its own error type for a torn header or a short file
            raise CorruptCheckpointError(
                f"{path} is not a complete safetensors file ({err}): the download or copy was cut short; fetch "
                "it again (huggingface_hub re-downloads a file whose size does not match)."
            ) from err
    return specs


def _disk_module(name: str, disk_modules: set[str]) -> list[str]:
    """Checkpoint module names that in-memory ``name`` can be (transformers renames prefixes only)."""
    segments = name.split(".")
    for i in range(len(segments)):
        suffix = ".".join(segments[i:])
        hits = [d for d in disk_modules if d == suffix or d.endswith("." + suffix)]
        if hits:
            return hits
    return []


def validate_checkpoint(files: list[str], model: nn.Module, names: list[str]) -> None:
    """Before loading: every packed module in ``names`` has all its tensors in ``files``, right shape and dtype.

    transformers would otherwise leave a missing buffer as uninitialised memory and, with
    ``ignore_mismatched_sizes=True``, re-initialise a mis-shaped one.
    """
    specs = checkpoint_specs(files)
    disk_modules = {k.rpartition(".")[0] for k in specs if k.rpartition(".")[2] in NATIVE_BUFFERS}
    problems: list[str] = []
    for name in names:
        expected = _expected(model.get_submodule(name))
        candidates = _disk_module(name, disk_modules)
        if not candidates:
            problems.append(f"{name}: no packed tensors in the checkpoint")
            continue
        for disk in candidates:
            for buf, want in expected.items():
                spec = specs.get(f"{disk}.{buf}")
                if spec is None:
                    problems.append(f"{disk}.{buf}: missing from the checkpoint")
                elif not want.accepts(*spec):
                    problems.append(f"{disk}.{buf}: {spec[0]} {spec[1]} in the checkpoint, expected {want}")
    if len(disk_modules) != len(names):
        problems.append(f"the checkpoint has {len(disk_modules)} packed modules, the config selects {len(names)}")
    _raise_if(problems)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise CorruptCheckpointError(
            "The tlq checkpoint is incomplete or corrupt; refusing to return a model with made-up weights:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            + "\nRe-save it with `model.save_pretrained(...)` from a quantized model, or re-quantize from the original."
        )


def _warn_cast_global_scales(model: nn.Module, names: list[str]) -> None:
    """Say so when the loader cast a float32 global scale to another dtype (transformers 4.57 casts every float
    tensor it loads to the model's dtype): the packed layers then compute with rounded global scales."""
    cast = sorted(
        {
            str(t.dtype)
            for name in names
            for key in ("weight_global_scale", "input_global_scale")
            if (t := getattr(model.get_submodule(name), key, None)) is not None and t.dtype != torch.float32
        }
    )
    if cast:
        logger.warning(
            "tlq_hf: this transformers loaded the float32 global scales of %s layers as %s: they are rounded, so "
            "outputs differ from the calibrated model's (transformers >= 5 keeps them exact).",
            "NVFP4",
            "/".join(cast),
        )


def _sane_scales(t: torch.Tensor) -> bool:
    """Finite and non-zero (uint8 E8M0 exponents: any byte is a non-zero power of two)."""
    return finite_scales(t) and (t.dtype == torch.uint8 or bool((t.float() != 0).all()))


def validate_packed_modules(model: nn.Module, names: list[str]) -> None:
    """Raise :class:`CorruptCheckpointError` unless every packed module in ``names`` holds loaded, sane tensors."""
    problems: list[str] = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, TLQLinear):
            problems.append(f"{name}: expected a packed TLQLinear, found {type(module).__name__}")
            continue
        for buf, want in _expected(module).items():
            t = getattr(module, buf, None)
            if t is None or t.device.type == "meta":
                problems.append(f"{name}.{buf}: missing from the checkpoint")
            elif not want.accepts(tuple(t.shape), SAFETENSORS_DTYPES.get(t.dtype)):
                problems.append(f"{name}.{buf}: {tuple(t.shape)} {t.dtype}, expected {want}")
            elif buf in ("weight_scale", "weight_global_scale", "input_global_scale") and not _sane_scales(t):
                problems.append(f"{name}.{buf}: non-finite or zero scales")
    _raise_if(problems)
