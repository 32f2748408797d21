"""compressed-tensors writer: our packed modules as a checkpoint transformers and vLLM load without tlq_hf.

- integer 2/3/4-bit weight-only, and 8-bit weight-only: ``pack-quantized`` (``weight_packed`` int32,
  ``weight_scale``, ``weight_shape``, ``weight_zero_point`` packed along rows when asymmetric; packed with
  compressed-tensors' own ``pack_to_int32``).
- integer weights with ``act_bits=8`` (W8A8, W4A8): ``int-quantized`` (``weight`` int8 codes, ``weight_scale``),
  dynamic per-token int8 (or FP8) input activations.
- float grids (FP8, NVFP4, MXFP4): ``float-quantized`` / ``naive-quantized``, ``nvfp4-pack-quantized``,
  ``mxfp4-pack-quantized``, whose tensors compressed-tensors' own compressor writes from the exact dequantized
  weight and our scales (the codes come back unchanged: a test decompresses and compares).

The format is whatever compressed-tensors itself infers for the scheme, so the two never disagree.
:class:`CompressedTensorsFormat` is the registered ``save_format="compressed-tensors"`` (the default).
"""

from __future__ import annotations

import functools
import logging

import torch
from accelerate.utils import align_module_device
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationConfig
from torch import nn
from transformers.utils.quantization_config import CompressedTensorsConfig

from ..arch import ignore_regexes, kept_by_role
from ..ct_schemes import SchemeArgsError, ct_scheme, scheme_from_ct
from ..experts import convention_of
from ..grids import grid_of
from ..nn import TLQLinear
from ..packing import pack, packed_shape
from ..qtypes import QuantScheme
from .base import FLOATS, FORMATS, SAFETENSORS_DTYPES, CheckpointFormat, TensorSpec, unsupported

__all__ = [
    "CompressedTensorsFormat",
    "ct_scheme",
    "ct_format",
    "ct_config",
    "ct_state_dict",
    "note_serving_bits",
    "vllm_serving",
]

logger = logging.getLogger(__name__)

#: Weight widths vLLM's compressed-tensors GPU kernels (Marlin / Machete / int8 GEMM) take.
VLLM_WEIGHT_BITS = (4, 8)

#: Which GPUs vLLM serves each float scheme on, by (weight grid, activation format or None), read from vLLM's
#: source (2026: ``compressed_tensors.py`` ``_get_scheme_from_parts``, the schemes' ``get_min_capability``, the
#: ``_POSSIBLE_*_KERNELS`` lists of ``model_executor/kernels/linear``, ``compressed_tensors_moe.get_moe_method``).
VLLM_SERVING: dict[tuple[str, str | None], str] = {
    ("fp8", "fp8"): "FP8 x FP8 matmuls on compute capability 8.9 and up (Ada, Hopper, Blackwell); on 7.5-8.6 "
    "(Turing, Ampere) vLLM falls back to weight-only FP8 (Marlin / Humming kernels, 16-bit activations).",
    ("fp8", None): "weight-only FP8 kernels (Marlin / Humming) on compute capability 7.5 and up; vLLM's fused MoE "
    "experts do not take this layout.",
    ("nvfp4", None): "weight-only FP4 on compute capability 7.5 and up: FlashInfer's CuteDSL kernel on Blackwell "
    "(SM100 / SM103), Marlin elsewhere.",
    ("nvfp4", "nvfp4"): "FP4 x FP4 matmuls on Blackwell (compute capability 10.x: CUTLASS / FlashInfer); on 7.5-9.0 "
    "(Turing to Hopper) vLLM falls back to weight-only FP4 (Marlin) and keeps activations in 16 bits.",
    ("mxfp4", None): "weight-only FP4 (Marlin) on compute capability 8.0 and up; on Blackwell with FlashInfer vLLM "
    "runs MXFP4 layers with MXFP4 activations too (W4A4), which this checkpoint was not calibrated for.",
    ("mxfp4", "mxfp4"): "FP4 x FP4 on Blackwell with FlashInfer; weight-only FP4 (Marlin) on compute capability 8.0 "
    "and up otherwise.",
    ("int", "fp8"): "Hopper only (compute capability 9.0, CUTLASS W4A8 with groups of 128); vLLM has no GPU kernel "
    "for it elsewhere.",
}


def vllm_serving(scheme: QuantScheme) -> str | None:
    """Where vLLM runs ``scheme`` natively and what it falls back to (``None`` for the integer schemes)."""
    act = scheme.act_format
    return VLLM_SERVING.get((scheme.grid, None if act is None else act.name))


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


#: the formats whose tensors tlq_hf lays out itself (integer codes, compressed-tensors' bit packing)
_INT_FORMATS = ("pack-quantized", "int-quantized")


def ct_format(scheme: QuantScheme) -> str:
    """The compressed-tensors format name compressed-tensors itself infers for ``scheme`` (``pack-quantized``,
    ``int-quantized``, ``float-quantized``, ``nvfp4-pack-quantized``, ...)."""
    return infer_module_format(nn.Linear, ct_scheme(scheme)).value


def _compressed(scheme: QuantScheme, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """compressed-tensors' own compressor for ``scheme``'s format applied to one module's uncompressed ``state``."""
    compressor = BaseCompressor.get_value_from_registry(ct_format(scheme))
    return dict(compressor.compress(state, ct_scheme(scheme)))


def _uncompressed(module: TLQLinear) -> dict[str, torch.Tensor]:
    """A float-grid module as compressed-tensors' compressors take it: the exact dequantized weight (float32), the
    group scales before compression, the global scales."""
    grid, qparams = grid_of(module.scheme), module.qparams()
    state = {"weight": module.dequantized_weight(torch.float32), "weight_scale": grid.ct_scale(qparams)}
    for name in ("weight_global_scale", "input_global_scale"):
        if hasattr(module, name):
            state[name] = getattr(module, name)
    return state


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
    else:
        out = _compressed(scheme, _uncompressed(module))
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


@functools.cache
def _compressed_specs(scheme: QuantScheme, shape: tuple[int, int] | None) -> dict[str, TensorSpec]:
    """What compressed-tensors' compressor writes for one module of weight ``shape``: found by compressing a small
    module with two rows and two groups, then scaling each dimension that grew with the weight (codes, group
    scales; a per-channel scale's column and a global scale stay 1)."""
    probe = (2, 2 * max(scheme.effective_group_size(64), 32))
    module = TLQLinear(probe[1], probe[0], scheme, bias=False, dtype=torch.bfloat16)
    specs = {}
    for key, tensor in _compressed(scheme, _uncompressed(module)).items():
        dtypes = FLOATS if tensor.dtype in (torch.float32, torch.bfloat16) else (SAFETENSORS_DTYPES[tensor.dtype],)
        scaled = None
        if shape is not None:
            scaled = tuple(n if n == 1 else want * n // have for n, want, have in zip(tensor.shape, shape, probe))
        specs[key] = TensorSpec(scaled, dtypes)
    return specs


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
        """Also refuses, on an MoE model, every format but integer ``pack-quantized``: transformers 5's conversion
        cannot merge a quantized ``weight`` tensor (``int-quantized``, ``float-quantized``) into fused experts, and
        merges FP4 experts (``nvfp4-`` / ``mxfp4-pack-quantized``) into a model whose logits are wrong without any
        error (measured: ``tests/test_moe.py``)."""
        super().check_model(model, config)
        if ct_format(config.scheme) == "pack-quantized":
            return
        fused = [name for name, module in model.named_modules() if convention_of(module) is not None]
        if fused:
            raise ValueError(
                f"{config.scheme.name} on a mixture-of-experts model ({len(fused)} fused experts modules, e.g. "
                f"{fused[0]!r}) would write a compressed-tensors checkpoint whose experts transformers cannot reload "
                f"(transformers does not merge {ct_format(config.scheme)} experts into fused ones correctly). Use an "
                f"integer weight-only scheme (e.g. W4A16), or save_format='tlq' to keep {config.scheme.name} in "
                "tlq_hf's own format."
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
        try:
            scheme = scheme_from_ct(group.get("weights") or {}, group.get("input_activations"))
        except SchemeArgsError as err:
            raise unsupported(f"{where}.{err.field}", repr(err.value)) from None
        if qc.get("format") != ct_format(scheme):
            raise unsupported("quantization_config.format", f"{qc.get('format')!r} for {scheme.name}")
        return scheme

    def module_tensors(self, scheme: QuantScheme, shape: tuple[int, int] | None) -> dict[str, TensorSpec]:
        if ct_format(scheme) not in _INT_FORMATS:
            return _compressed_specs(scheme, shape)
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
        serving = vllm_serving(scheme)
        if serving is not None:
            lines += ["", f"vLLM serves {scheme.name} with {serving}"]
        elif scheme.bits not in VLLM_WEIGHT_BITS:
            lines += [
                "",
                f"vLLM's usual GPU kernels take 4- and 8-bit weights; {scheme.bits}-bit weights serve only where a "
                "kernel for that width exists.",
            ]
        return lines
