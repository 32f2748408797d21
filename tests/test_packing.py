import pytest
import torch

from tlq_hf.packing import pack, packed_shape, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(7, 128), (256, 96), (3, 33)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip_is_exact(bits, shape, dim):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)
    codes[0, 0], codes[-1, -1] = lo, hi  # both ends of the range
    packed = pack(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == packed_shape(shape, bits, dim)
    assert torch.equal(unpack(packed, bits, shape, dim=dim), codes)


def test_pack_layout_is_documented_little_endian_bitstream():
    # 4-bit codes 0..7 offset to unsigned 8..15: word 0 holds code i in bits [4i, 4i+4)
    codes = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    packed = pack(codes, 4)
    expected = sum(int(u) << (4 * i) for i, u in enumerate(range(0, 8)))
    assert packed.shape == (1, 2)
    assert int(packed[0, 0]) & 0xFFFFFFFF == expected


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of the 3-bit range"):
        pack(torch.tensor([[5]], dtype=torch.int8), 3)


def test_unpack_rejects_wrong_shape():
    packed = pack(torch.zeros(4, 32, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="must be"):
        unpack(packed, 3, (4, 64))


def test_dequant_cache_gives_identical_outputs_and_is_released():
    from tlq_hf.nn import TLQLinear, dequant_cache
    from tlq_hf.qtypes import QuantScheme
    from tlq_hf.solvers import rtn

    scheme = QuantScheme(bits=3, group_size=64)
    w = torch.randn(32, 128)
    module = TLQLinear.from_codes(*rtn(w, scheme), scheme)
    x = torch.randn(5, 128)
    plain = module(x)
    with dequant_cache(module):
        assert torch.equal(module(x), plain) and module._cache is not None
        assert torch.equal(module(x), plain)
    assert module._cache is None and torch.equal(module(x), plain)
