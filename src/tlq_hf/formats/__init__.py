"""Storage formats: compressed-tensors (default) and the native ``tlq`` format."""

from .compressed_tensors import ct_config, ct_state_dict, note_serving_bits
from .native import (
    NATIVE_BUFFERS,
    CorruptCheckpointError,
    swap_in_packed_modules,
    validate_checkpoint,
    validate_packed_modules,
)

__all__ = [
    "ct_config",
    "ct_state_dict",
    "note_serving_bits",
    "NATIVE_BUFFERS",
    "CorruptCheckpointError",
    "swap_in_packed_modules",
    "validate_checkpoint",
    "validate_packed_modules",
]
