"""Per-expert checkpoint keys that transformers can load back into fused experts.

tlq_hf writes MoE experts under per-expert names (``mlp.experts.3.gate_proj.weight_packed``): the names of the
original per-expert checkpoints and of vLLM's MoE loaders. transformers merges such keys into its fused
``gate_up_proj`` / ``down_proj`` parameters (dequantizing compressed-tensors on the way) through each model
type's checkpoint conversion mapping, which most MoE types have (the ``qwen2_moe`` merges). A few types
whose original checkpoints store the experts fused (Qwen3-VL-MoE: ``[E, H, 2I]``, transposed on load) only
carry the transpose. :func:`register_expert_merges` adds the per-expert merges to exactly those mappings,
through transformers' public ``register_checkpoint_conversion_mapping``, when ``tlq_hf`` is imported; their
fused-key converters stay, so original checkpoints load as before.
"""

from __future__ import annotations

import logging

__all__ = ["MERGED_TYPES", "register_expert_merges", "merges_needed"]

logger = logging.getLogger(__name__)

#: Model types :func:`register_expert_merges` gave the per-expert merges (their checkpoints need ``import tlq_hf``).
MERGED_TYPES: set[str] = set()

_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _converters():
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    class LoadOnlyConverter(WeightConverter):
        """A merge used when loading only: saving reverses the model type's own converters (fused keys, as its
        original checkpoints have them). Reversed, this one would claim the fused keys too and transformers'
        save would file them under the wrong converter (prefixes lost, experts unloadable)."""

        def reverse_transform(self) -> WeightRenaming:
            return WeightRenaming(source_patterns=r"^\b$", target_patterns="")  # matches no key

    return [
        LoadOnlyConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        LoadOnlyConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def merges_needed(mapping: list) -> bool:
    """Whether a model type's conversion ``mapping`` transposes fused experts but cannot merge per-expert keys."""
    from transformers.core_model_loading import Transpose, WeightConverter

    converters = [c for c in mapping if isinstance(c, WeightConverter)]
    per_expert = any("experts.*." in s for c in converters for s in c._original_source_patterns)
    transposed = any(
        any(t in _FUSED for t in c._original_target_patterns) and any(isinstance(o, Transpose) for o in c.operations)
        for c in converters
    )
    return transposed and not per_expert


def register_expert_merges() -> list[str]:
    """Add the per-expert merges to every conversion mapping that needs them (:func:`merges_needed`); returns the
    model types changed. Does nothing on transformers without conversion mappings (4.x loads per-expert keys
    into its per-expert modules directly)."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:
        return []
    if not hasattr(cm, "register_checkpoint_conversion_mapping"):
        return []
    changed = []
    for model_type in cm._build_checkpoint_conversion_mapping():
        current = cm.get_checkpoint_conversion_mapping(model_type)
        if current is not None and merges_needed(current):
            cm.register_checkpoint_conversion_mapping(model_type, _converters() + current, overwrite=True)
            changed.append(model_type)
    MERGED_TYPES.update(changed)
    if changed:
        logger.debug("tlq_hf: per-expert key merges registered for %s", changed)
    return changed
