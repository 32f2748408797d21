"""compressed-tensors writer: our packed modules as a checkpoint transformers and vLLM load without tlq_hf.

- 2/3/4-bit weight-only, and 8-bit weight-only: ``pack-quantized`` (``weight_packed`` int32, ``weight_scale``,
  ``weight_shape``, ``weight_zero_point`` packed along rows when asymmetric).
- with ``act_bits=8`` (W8A8, W4A8): ``int-quantized`` (``weight`` int8 codes, ``weight_scale``), dynamic
  per-token int8 input activations.

The format is whatever compressed-tensors itself infers for the scheme, so the two never disagree.
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

from ..nn import TLQLinear
from ..packing import pack
from ..qtypes import QuantScheme

__all__ = ["ct_scheme", "ct_format", "ct_config", "ct_state_dict", "note_serving_bits"]

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
