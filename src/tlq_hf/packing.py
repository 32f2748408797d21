"""Dense bit-packing of signed integer codes into ``int32`` words (the compressed-tensors layout).

Layout, for ``b``-bit codes ``q`` of a ``[rows, cols]`` tensor packed along ``dim=1`` (columns):
each code is offset to unsigned (``u = q + 2**(b-1)``); code ``i`` of a row occupies bits
``[i*b, (i+1)*b)`` of the row's little-endian bit stream, word ``k`` holding stream bits ``[32k, 32k+32)``.
A code may straddle two words (3-bit). The packed tensor is ``int32 [rows, ceil(cols*b/32)]``; with
``dim=0`` the same is done along rows (``[ceil(rows*b/32), cols]``), as compressed-tensors stores
asymmetric zero points. The compressed-tensors implementation is used, so our native checkpoints
and compressed-tensors checkpoints share one definition.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

__all__ = ["pack", "unpack", "packed_shape"]


def packed_shape(shape: tuple[int, int], bits: int, dim: int = 1) -> tuple[int, int]:
    """Shape of the ``int32`` tensor that :func:`pack` returns for codes of ``shape``."""
    rows, cols = shape
    if dim == 1:
        return rows, math.ceil(cols * bits / 32)
    return math.ceil(rows * bits / 32), cols


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} cannot be packed: use 1..8.")


def pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``int8`` codes in ``[-2**(b-1), 2**(b-1)-1]`` into ``int32`` along ``dim``."""
    _check_bits(bits)
    if codes.dtype != torch.int8 or codes.ndim != 2:
        raise ValueError(f"pack expects a 2-D int8 tensor, got {codes.ndim}-D {codes.dtype}.")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes out of the {bits}-bit range [{lo}, {hi}]: cannot pack without corruption.")
    return pack_to_int32(codes, bits, packed_dim=dim)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack`: ``int32`` words back to signed ``int8`` codes of ``shape``."""
    _check_bits(bits)
    expected = packed_shape(tuple(shape), bits, dim)
    if packed.dtype != torch.int32 or tuple(packed.shape) != expected:
        raise ValueError(
            f"packed tensor is {tuple(packed.shape)} {packed.dtype}; {bits}-bit codes of shape {tuple(shape)} "
            f"packed along dim {dim} must be {expected} int32."
        )
    if dim == 0:  # unpack rows as columns of the transpose; flat view gives standard strides for size-1 dims
        t = packed.t().contiguous().view(-1).view(packed.shape[1], packed.shape[0])
        return unpack_from_int32(t, bits, torch.Size((shape[1], shape[0])), packed_dim=1).t().contiguous()
    return unpack_from_int32(packed.contiguous(), bits, torch.Size(shape), packed_dim=1)
