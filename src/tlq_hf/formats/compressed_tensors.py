"""compressed-tensors writer: our packed modules as a checkpoint transformers and vLLM load without tlq_hf.

- 2/3/4-bit weight-only, and 8-bit weight-only: ``pack-quantized`` (``weight_packed`` int32, ``weight_scale``,
  ``weight_shape``, ``weight_zero_point`` packed along rows when asymmetric).
- with ``act_bits=8`` (W8A8, W4A8): ``int-quantized`` (``weight`` int8 codes, ``weight_scale``), dynamic
  per-token int8 input activations.

The format is whatever compressed-tensors itself infers for the scheme, so the two never disagree.
:class:`CompressedTensorsFormat` is the registered ``save_format="compressed-tensors"`` (the default).
"""

from __future__ import annotations

import functools
import logging

import torch
from accelerate.utils import align_module_device
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from torch import nn
from transformers.utils.quantization_config import CompressedTensorsConfig

from ..arch import ignore_regexes, kept_by_role
from ..experts import convention_of
from ..nn import TLQLinear
from ..packing import pack, packed_shape
from ..qtypes import SUPPORTED_WEIGHT_BITS, QuantScheme
from .base import FLOATS, FORMATS, CheckpointFormat, TensorSpec, unsupported

__all__ = [
    "CompressedTensorsFormat",
    "ct_scheme",
    "ct_format",
    "ct_config",
    "ct_state_dict",
    "note_serving_bits",
]

logger = logging.getLogger(__name__)

#: Weight widths vLLM's compressed-tensors GPU kernels (Marlin / Machete / int8 GEMM) take.
VLLM_WEIGHT_BITS = (4, 8)


@functools.cache
def note_serving_bits(bits: int) -> None:
    """Log once per width when a checkpoint's weights are a width vLLM's usual GPU kernels do not take."""
    if bits not in VLLM_WEIGHT_BITS:
        logger.warning(
            "tlq_hf: writing %d-bit weights as compressed-tensors: transformers reloads them (dequantized), but "
            "vLLM's GPU kernels take 4- and 8-bit weights; %d-bit serves only where a kernel for that width exists "
            "(newer vLLM builds). Use bits=4 or 8 to serve with vLLM anywhere.",
            bits,
            bits,
        )


def ct_scheme(scheme: QuantScheme, targets: list[str] | None = None) -> QuantizationScheme:
    """The compressed-tensors scheme equivalent to ``scheme``."""
    grouped = scheme.group_size != -1
    weights = QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.sym,
        strategy="group" if grouped else "channel",
        group_size=scheme.group_size if grouped else None,
        dynamic=False,
    )
    acts = None
    if scheme.act_bits is not None:
        acts = QuantizationArgs(num_bits=scheme.act_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=targets or ["Linear"], weights=weights, input_activations=acts)


def ct_format(scheme: QuantScheme) -> str:
    """The compressed-tensors format name for ``scheme`` (``pack-quantized`` or ``int-quantized``)."""
    return infer_module_format(nn.Linear, ct_scheme(scheme)).value


def ct_config(scheme: QuantScheme, ignore: list[str]) -> CompressedTensorsConfig:
    """The ``quantization_config`` for config.json: every ``Linear`` except ``ignore`` (regexes)."""
    qc = QuantizationConfig(
        config_groups={"group_0": ct_scheme(scheme)},
        ignore=list(ignore),
        format=ct_format(scheme),
        quantization_status="compressed",
    )
    return CompressedTensorsConfig.from_dict(qc.model_dump(mode="json"))


def _module_tensors(module: TLQLinear) -> dict[str, torch.Tensor]:
    scheme = module.scheme
    fmt = ct_format(scheme)
    out: dict[str, torch.Tensor] = {"weight_scale": module.weight_scale}
    if fmt == "pack-quantized":
        out["weight_packed"] = module.packed_weight()
        out["weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
        if not scheme.sym:
            out["weight_zero_point"] = pack(module.weight_zero_point, scheme.bits, dim=0)
    elif fmt == "int-quantized":
        out["weight"] = module.codes()
        if not scheme.sym:
            out["weight_zero_point"] = pack(module.weight_zero_point, scheme.bits, dim=0)
    else:  # a scheme compressed-tensors maps elsewhere would need its own writer
        raise ValueError(f"tlq_hf cannot write {scheme.name} as compressed-tensors format {fmt!r}.")
    if module.bias is not None:
        out["bias"] = module.bias
    return out


def ct_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every :class:`TLQLinear` in compressed-tensors layout (in-memory names)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, TLQLinear):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix) :]]:
            del state[key]
        with align_module_device(module):  # a packed layer the device map keeps on disk is read back here
            state.update({prefix + k: v for k, v in _module_tensors(module).items()})
    return state


@FORMATS.register
class CompressedTensorsFormat(CheckpointFormat):
    """The default: reloads in plain transformers (the compressed-tensors package decodes it) and serves in vLLM."""

    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    tag = "compressed-tensors"
    needs_plugin = False

    def check_config(self, config) -> None:
        if not config.sym:
            raise ValueError(
                "TLQConfig(sym=False) cannot be saved as compressed-tensors: transformers (4.57 and 5.x) fails to "
                "reload asymmetric pack-quantized checkpoints (its loader expects an unpacked zero point, "
                "the format packs it). Use sym=True, or save_format='tlq' for asymmetric weights."
            )

    def check_model(self, model: nn.Module, config) -> None:
        """Also refuses activation-quantized schemes on an MoE model: they store int8 ``weight`` tensors
        (``int-quantized``), which transformers 5's conversion cannot merge into fused experts."""
        super().check_model(model, config)
        if config.act_bits is None:
            return
        fused = [name for name, module in model.named_modules() if convention_of(module) is not None]
        if fused:
            raise ValueError(
                f"{config.scheme.name} on a mixture-of-experts model ({len(fused)} fused experts modules, e.g. "
                f"{fused[0]!r}) would write a compressed-tensors checkpoint whose experts transformers cannot reload "
                "(activation-quantized schemes store int8 weights it does not merge into fused experts). Use a "
                f"weight-only scheme (act_bits=None), or save_format='tlq' to keep {config.scheme.name} in tlq_hf's "
                "own format."
            )

    def finish(self, model: nn.Module, config) -> None:
        """``config.quantization_config`` becomes the equivalent compressed-tensors config (``ignore``: every
        linear left unpacked, and routers kept by role, Linear or not: vLLM builds some as quantizable linears,
        e.g. Qwen3-VL-MoE's ``mlp.gate``)."""
        packed = {n for n, m in model.named_modules() if isinstance(m, TLQLinear)}
        linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, TLQLinear))}
        linears |= set(kept_by_role(model))
        model.config.quantization_config = ct_config(config.scheme, ignore_regexes(linears, packed))

    def state_dict(self, model: nn.Module, config) -> dict[str, torch.Tensor]:
        note_serving_bits(config.bits)
        return ct_state_dict(model)

    def scheme_of(self, quantization_config: dict) -> QuantScheme:
        qc = quantization_config
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise unsupported("quantization_config.config_groups", f"{len(groups)} groups")
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
                raise unsupported(f"{where}.weights.{field}", repr(w.get(field)))
        acts = group.get("input_activations")
        act_bits = None
        if acts is not None:
            wanted = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
            for field, value in wanted.items():
                if acts.get(field) != value:
                    raise unsupported(f"{where}.input_activations.{field}", repr(acts.get(field)))
            act_bits = 8
        group_size = w["group_size"] if w["strategy"] == "group" else -1
        scheme = QuantScheme(bits=w["num_bits"], group_size=group_size, sym=w["symmetric"], act_bits=act_bits)
        if qc.get("format") != ct_format(scheme):
            raise unsupported("quantization_config.format", f"{qc.get('format')!r} for {scheme.name}")
        return scheme

    def module_tensors(self, scheme: QuantScheme, shape: tuple[int, int] | None) -> dict[str, TensorSpec]:
        groups = scheme.groups(shape[1]) if shape else None
        specs = {"weight_scale": TensorSpec((shape[0], groups) if shape else None, FLOATS)}
        if ct_format(scheme) == "int-quantized":
            specs["weight"] = TensorSpec(shape, ("I8",))
        else:
            specs["weight_packed"] = TensorSpec(packed_shape(shape, scheme.bits) if shape else None, ("I32",))
        if not scheme.sym:  # packed along rows
            zero = (packed_shape((shape[0], groups), scheme.bits, dim=0)) if shape else None
            specs["weight_zero_point"] = TensorSpec(zero, ("I32",))
        return specs

    def usage(self, name: str, scheme: QuantScheme) -> list[str]:
        lines = [
            "Plain transformers (the `compressed-tensors` package decodes the weights; tlq_hf is not needed):",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            f'model = AutoModelForImageTextToText.from_pretrained("{name}")',
            f'processor = AutoProcessor.from_pretrained("{name}")',
            "```",
            "",
            "vLLM (compressed-tensors):",
            "",
            "```bash",
            f"vllm serve {name}",
            "```",
        ]
        if scheme.bits not in VLLM_WEIGHT_BITS:
            lines += [
                "",
                f"vLLM's usual GPU kernels take 4- and 8-bit weights; {scheme.bits}-bit weights serve only where a "
                "kernel for that width exists.",
            ]
        return lines
