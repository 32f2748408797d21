"""Architectures whose quantized checkpoints the installed transformers cannot reload, per format.

Found by the architecture sweep (``tests/arch_sweep.py``: every image-text-to-text class, quantized, saved and
reloaded); each is a fault of transformers' own key conversion for that type, not of the checkpoint. A run that
would write such a checkpoint is refused before any weight changes (:func:`check_reloadable`), naming the format
that does reload where there is one. ``tests/test_arch_sweep.py`` keeps this table and the sweep in agreement.
"""

from __future__ import annotations

import transformers

__all__ = ["RELOAD_FAILURES", "check_reloadable", "reload_failure"]

#: transformers major version -> save format -> model type -> why its checkpoint does not reload
RELOAD_FAILURES: dict[str, dict[str, dict[str, str]]] = {
    "5": {
        "compressed-tensors": {
            "mistral_large4": "its Mistral-native q/k key converters (PermuteForRope) also permute packed tensors: "
            "the reloaded weights differ",
            "ovis2_5": "its key conversion fails on compressed-tensors keys (CONVERSION entries of the load report)",
            "qianfan_ocr": "its vision attn.qkv converter expects compressed-tensors keys of a linear kept in full "
            "precision",
        },
        "tlq": {
            "mistral_large4": "its key renames on save (self_attn.kv_a_proj_with_mqa -> attention.wkv_a_with_mqa, ...) "
            "leave no packed tensor under the names it loads",
        },
    },
    "4": {
        "compressed-tensors": {
            "udop": "transformers 4.57's compressed-tensors loading fails for it (compressed and decompressed alike)",
        },
    },
}


def _major() -> str:
    return transformers.__version__.split(".")[0]


def reload_failure(model_type: str, save_format: str) -> str | None:
    """Why this transformers cannot reload a ``save_format`` checkpoint of ``model_type`` (``None``: it can)."""
    return RELOAD_FAILURES.get(_major(), {}).get(save_format, {}).get(model_type)


def check_reloadable(model_type: str, save_format: str, formats: tuple[str, ...]) -> None:
    """Raise ``ValueError`` if a ``save_format`` checkpoint of ``model_type`` would not reload, naming the fix (the
    first of ``formats`` that does reload)."""
    reason = reload_failure(model_type, save_format)
    if reason is None:
        return
    working = [f for f in formats if f != save_format and reload_failure(model_type, f) is None]
    fix = (
        f"use save_format={working[0]!r}, which reloads (with `import tlq_hf`)"
        if working
        else f"no format tlq_hf writes reloads for {model_type} on this transformers: quantize it with another "
        "transformers version"
    )
    raise ValueError(
        f"{model_type}: transformers {transformers.__version__} cannot reload a {save_format} checkpoint of this "
        f"architecture ({reason}); refused before any weight changes: {fix}."
    )
