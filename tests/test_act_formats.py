"""Activation formats against compressed-tensors' own dynamic activation quantization (bit for bit)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import forward_quantize

from tlq_hf.act_formats import ACT_FORMATS
from tlq_hf.qtypes import QuantScheme


def _reference(fmt, x: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' forward quantization of a layer input with these activation arguments."""
    module = torch.nn.Linear(x.shape[-1], 4)
    module.quantization_status = QuantizationStatus.FROZEN
    if global_scale is not None:
        module.input_global_scale = global_scale
    return forward_quantize(module, x, "input", QuantizationArgs(**fmt.ct_args()))


@pytest.mark.parametrize("name", ACT_FORMATS.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formats_match_compressed_tensors(name, dtype):
    torch.manual_seed(0)
    fmt = ACT_FORMATS[name]
    x = (torch.randn(2, 5, 64) * torch.logspace(-2, 1, 64)).to(dtype)  # channels of very different ranges
    x[0, 1] = 0  # an all-zero token: the scale's zero guard
    global_scale = fmt.global_scale(x.float().abs().amax() * 1.5) if fmt.has_global_scale else None
    ours = fmt.fake_quantize(x, global_scale)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert torch.equal(ours, _reference(fmt, x, global_scale))
    assert not torch.equal(ours, x)  # it quantized something
    assert torch.isfinite(ours).all()


def test_every_activation_format_is_reachable_from_a_scheme():
    for fmt in ACT_FORMATS.values():
        grid = {"int": "int", "fp8": "fp8", "nvfp4": "nvfp4", "mxfp4": "mxfp4"}[fmt.name]
        bits = 8 if grid in ("int", "fp8") else 4
        group = {"nvfp4": 16, "mxfp4": 32}.get(grid, -1)
        scheme = QuantScheme(bits=bits, group_size=group, act_bits=fmt.bits, grid=grid, act_grid=fmt.name)
        assert scheme.act_format is fmt


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(act_bits=4), "act_bits=4 does not fit act_grid='int'"),
        (dict(act_grid="fp8"), "act_grid='fp8' with act_bits=None"),
        (dict(act_bits=8, act_grid="nvfp4"), "use act_bits=4"),
        (dict(act_grid="fp4"), "is not an activation format"),
    ],
)
def test_bad_activation_fields_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantScheme(**fields)
