"""Storage formats, one object each (:class:`~tlq_hf.formats.base.CheckpointFormat` in :data:`FORMATS`):
compressed-tensors (default) and the native ``tlq`` format."""

from .base import FORMATS, CheckpointFormat, TensorSpec, UnsupportedSchemeError, format_of
from .compressed_tensors import CompressedTensorsFormat, ct_config, ct_state_dict, note_serving_bits
from .native import (
    NATIVE_BUFFERS,
    CorruptCheckpointError,
    NativeFormat,
    swap_in_packed_modules,
    validate_checkpoint,
    validate_packed_modules,
)

__all__ = [
    "FORMATS",
    "CheckpointFormat",
    "CompressedTensorsFormat",
    "NativeFormat",
    "TensorSpec",
    "UnsupportedSchemeError",
    "format_of",
    "ct_config",
    "ct_state_dict",
    "note_serving_bits",
    "NATIVE_BUFFERS",
    "CorruptCheckpointError",
    "swap_in_packed_modules",
    "validate_checkpoint",
    "validate_packed_modules",
]
