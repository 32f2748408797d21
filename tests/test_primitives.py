import pytest
import torch

from tlq_hf.primitives import (
    compute_qparams,
    dequantize_codes,
    fake_quantize_activation,
    quantize_codes,
    quantize_weight,
)
from tlq_hf.qtypes import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [64, -1])
def test_codes_in_range_and_error_shrinks_with_bits(bits, sym, group_size):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    codes, qp = quantize_weight(w, scheme)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    assert qp.scale.shape == (32, scheme.groups(256))
    err = (dequantize_codes(codes, qp, scheme, torch.float32) - w).norm() / w.norm()
    # uniform quantization of a Gaussian: relative error roughly halves per extra bit
    assert err < {2: 0.7, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def test_rounding_is_nearest_and_dequant_is_exact_on_grid():
    scheme = QuantScheme(bits=4, group_size=-1)
    w = torch.randn(4, 128)
    codes, qp = quantize_weight(w, scheme)
    deq = dequantize_codes(codes, qp, scheme, torch.float32)
    # re-quantizing a point of the grid returns the same codes
    assert torch.equal(quantize_codes(deq, qp, scheme), codes)
    # nearest rounding: no weight is more than half a step from its dequantized value (unless clamped)
    step = qp.scale.float()
    assert ((deq - w).abs() <= step / 2 + 1e-6).float().mean() > 0.99


def test_scale_is_rounded_to_storage_dtype():
    w = torch.randn(8, 128)
    qp = compute_qparams(w, QuantScheme(bits=4, group_size=128), scale_dtype=torch.bfloat16)
    assert qp.scale.dtype == torch.bfloat16


def test_asymmetric_covers_shifted_ranges_better():
    w = torch.rand(16, 128) + 0.5  # all positive

    def sym_err(s):
        return (dequantize_codes(*quantize_weight(w, s), s, torch.float32) - w).norm()

    assert sym_err(QuantScheme(bits=3, group_size=128, sym=False)) < sym_err(QuantScheme(bits=3, group_size=128))


def test_zero_weights_give_finite_scales():
    codes, qp = quantize_weight(torch.zeros(4, 128), QuantScheme(bits=4, group_size=128))
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all() and (codes == 0).all()


def test_fake_quantize_activation_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 5, 64) * 3).to(dtype)
        x[0, 0] = 0  # an all-zero token
        scale, zp = calculate_qparams(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), args)
        ref = fake_quantize(x, scale, zp, args)
        assert torch.equal(fake_quantize_activation(x, 8), ref)
