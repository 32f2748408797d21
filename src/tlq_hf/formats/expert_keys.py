"""Per-expert checkpoint keys that transformers can load back into fused experts.

tlq_hf writes MoE experts under per-expert names (``mlp.experts.3.gate_proj.weight_packed``): the names of the
original per-expert checkpoints and of vLLM's MoE loaders. transformers merges such keys into its fused
``gate_up_proj`` / ``down_proj`` parameters (dequantizing compressed-tensors on the way) through each model
type's checkpoint conversion mapping, which most MoE types have (the ``qwen2_moe`` merges). Types whose
original checkpoints store the experts fused carry no merge: a transpose only (Qwen3-VL-MoE: ``[E, H, 2I]``)
or no mapping at all (Mistral 4, Gemma 4). :func:`register_expert_merges` adds the per-expert merges, through
transformers' public ``register_checkpoint_conversion_mapping``, when ``tlq_hf`` is imported, to every model
type whose modeling code uses transformers' experts interface in its default layout (``[E, 2I, H]`` gate then
up, ``[E, H, I]``; found by reading the installed modeling sources, 72 folders on 5.25) and whose mapping
lacks them; fused-key converters stay, so original checkpoints load as before. :func:`plain_reload_merges`
says whether transformers alone (without tlq_hf) would merge a given model's per-expert keys.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from torch import nn

__all__ = ["MERGED_TYPES", "experts_model_types", "merges_needed", "plain_reload_merges", "register_expert_merges"]

logger = logging.getLogger(__name__)

#: Model types :func:`register_expert_merges` gave the per-expert merges, with the mapping each had before
#: (``None``: no mapping).
MERGED_TYPES: dict[str, list | None] = {}
_DECORATOR = re.compile(rb"@use_experts_implementation(\((?P<args>[^)]*)\))?")

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
            source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
            target_patterns="experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        LoadOnlyConverter(
            source_patterns="experts.*.down_proj.weight",
            target_patterns="experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def _has_merges(mapping: list | None) -> bool:
    from transformers.core_model_loading import WeightConverter

    return any(
        "experts.*." in src
        for c in mapping or []
        if isinstance(c, WeightConverter)
        for src in c._original_source_patterns
    )


def merges_needed(mapping: list | None) -> bool:
    """Whether a conversion ``mapping`` (``None``: none) of a default-layout experts type lacks per-expert merges."""
    return not _has_merges(mapping)


def experts_model_types() -> set[str]:
    """Model types whose modeling code applies transformers' experts interface in its default layout (the
    decorator without arguments), read from the installed ``transformers/models/*/modeling_*.py``."""
    import transformers.models as models
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    folders = set()
    for path in Path(models.__file__).parent.glob("*/modeling_*.py"):
        found = [m.group("args") for m in _DECORATOR.finditer(path.read_bytes())]
        if found and all(not (args or b"").strip() for args in found):
            folders.add(path.parent.name)
    return {t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) in folders}


def register_expert_merges() -> list[str]:
    """Add the per-expert merges to every default-layout experts type whose mapping lacks them
    (:func:`experts_model_types`, :func:`merges_needed`); returns the model types changed. Does nothing on
    transformers without conversion mappings (4.x loads per-expert keys into its per-expert modules directly)."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:
        return []
    if not hasattr(cm, "register_checkpoint_conversion_mapping"):
        return []
    changed = []
    for model_type in sorted(experts_model_types() - set(MERGED_TYPES)):
        current = cm.get_checkpoint_conversion_mapping(model_type)
        if merges_needed(current):
            cm.register_checkpoint_conversion_mapping(model_type, _converters() + (current or []), overwrite=True)
            MERGED_TYPES[model_type] = current
            changed.append(model_type)
    if changed:
        logger.debug("tlq_hf: per-expert key merges registered for %s", changed)
    return changed


def plain_reload_merges(model: nn.Module) -> bool:
    """Whether transformers without tlq_hf merges ``model``'s per-expert keys into its fused experts: some
    sub-model's own mapping (by class name, else model type, as transformers looks them up) has the merges."""
    try:
        from transformers import PreTrainedModel
        from transformers import conversion_mapping as cm
    except ImportError:
        return True
    if not hasattr(cm, "get_checkpoint_conversion_mapping"):
        return True  # transformers 4.x: per-expert modules, per-expert keys
    from ..experts import UnfusedExperts

    # experts of transformers' interface only: Llama 4's per-model experts load per expert through
    # transformers' own compressed-tensors path
    if not any(isinstance(m, UnfusedExperts) and m.convention.name == "experts-interface" for m in model.modules()):
        return True
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        for key in (type(module).__name__, getattr(module.config, "model_type", None)):
            mapping = MERGED_TYPES[key] if key in MERGED_TYPES else cm.get_checkpoint_conversion_mapping(key)
            if _has_merges(mapping):
                return True
    return False
