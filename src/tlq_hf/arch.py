"""Model plumbing that holds for every architecture: where the decoder stack is, which linears to quantize,
and how to name the rest in a rename-proof ``ignore`` list.

Nothing here is per-model code. The decoder stack is the ``nn.ModuleList`` of the text model (the module
``get_decoder()`` returns, or the one owning the text config) whose length is the text config's
``num_hidden_layers``. Per-architecture facts, where one is ever needed, go in :data:`ARCH_FACTS` as data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ARCH_FACTS",
    "DEFAULT_SMOOTH_MAPPINGS",
    "IMAGE_TOKEN_ATTRS",
    "decoder_device_map",
    "find_final_norm",
    "image_token_id",
    "load_auto_class",
    "smooth_mappings",
    "swap_module",
    "DecoderStack",
    "NoDecoderStackError",
    "find_decoder_stack",
    "select_quant_targets",
    "kept_by_role",
    "ignore_regexes",
    "matches_any",
]

# model_type -> facts that generic discovery cannot infer. Keys understood: "decoder_layers" (dotted path of
# the decoder ModuleList in memory), "final_norm" (dotted path of the norm before lm_head), "smooth_mappings"
# (like DEFAULT_SMOOTH_MAPPINGS). Empty while every supported family is found generically.
ARCH_FACTS: dict[str, dict] = {}

# Inside one decoder layer: (producer, consumers) pairs whose shared input can be rescaled per channel by
# folding 1/s into the producer (a norm's weight, or a linear's output rows) and s into the consumers'
# weight columns. Names are suffix regexes relative to the layer; pairs whose modules are missing or whose
# shapes disagree are skipped, and the layer loop folds only where a fold leaves the layer's output unchanged
# (checked once per model). Holds for Llama/Qwen2/Qwen2-VL/Qwen2.5-VL style decoders and for Gemma 3's, whose
# MLP reads ``pre_feedforward_layernorm`` (its ``post_attention_layernorm`` normalises the attention output).
DEFAULT_SMOOTH_MAPPINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"input_layernorm", (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj")),
    (r"self_attn\.v_proj", (r"self_attn\.o_proj",)),
    (r"post_attention_layernorm", (r"mlp\.gate_proj", r"mlp\.up_proj")),
    (r"pre_feedforward_layernorm", (r"mlp\.gate_proj", r"mlp\.up_proj")),
    (r"mlp\.up_proj", (r"mlp\.down_proj",)),
)

# Config attributes that name the image token id, in lookup order.
IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")


class NoDecoderStackError(ValueError):
    """The model has no language-model decoder stack that tlq_hf can find."""


@dataclass(frozen=True)
class DecoderStack:
    """The decoder layers of the language model and where they live."""

    path: str
    layers: nn.ModuleList

    def layer_prefix(self, index: int) -> str:
        return f"{self.path}.{index}"

    def layer_index(self, name: str) -> int:
        """The index of the decoder layer that the module called ``name`` belongs to."""
        rest = name.removeprefix(self.path + ".")
        head = rest.split(".", 1)[0]
        if rest == name or not head.isdigit():
            raise ValueError(f"{name!r} is not inside the decoder layers {self.path!r}")
        return int(head)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if get_text is not None else config


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """Locate the language-model decoder layers of ``model`` (a transformers ``PreTrainedModel``)."""
    config = getattr(model, "config", None)
    facts = ARCH_FACTS.get(getattr(config, "model_type", ""), {})
    if "decoder_layers" in facts:
        return DecoderStack(facts["decoder_layers"], model.get_submodule(facts["decoder_layers"]))
    text_config = _text_config(model)
    n_layers = getattr(text_config, "num_hidden_layers", None)
    if n_layers is None:
        raise NoDecoderStackError(
            f"{type(model).__name__} has no text config with `num_hidden_layers`: no language-model decoder "
            "stack to quantize. tlq_hf quantizes transformers vision-language / causal LM models."
        )
    owners: list[nn.Module] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if isinstance(decoder, nn.Module):
            owners.append(decoder)
    owners += [m for m in model.modules() if getattr(m, "config", None) is text_config and m not in owners]
    names = {id(m): n for n, m in model.named_modules()}
    for owner in owners:
        stacks = [(n, m) for n, m in owner.named_children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        if len(stacks) == 1 and id(owner) in names:
            child, layers = stacks[0]
            prefix = names[id(owner)]
            return DecoderStack(f"{prefix}.{child}" if prefix else child, layers)
    raise NoDecoderStackError(
        f"Could not find the language-model decoder stack of {type(model).__name__}: no module list of "
        f"{n_layers} layers under the text model. Add its dotted path to tlq_hf.arch.ARCH_FACTS"
        f"[{getattr(config, 'model_type', '?')!r}]['decoder_layers']."
    )


def _pattern(p: str) -> re.Pattern[str]:
    return re.compile(p.removeprefix("re:"))


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` matches one of ``patterns`` (regexes, anchored at the start, ``re:`` optional)."""
    return any(_pattern(p).match(name) for p in patterns)


def _overrides_forward(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward


def _expert_list(module: nn.Module) -> bool:
    """A ``ModuleList`` of per-expert MLPs (transformers 4.x MoE blocks): two or more modules of one class whose
    children are all linears or parameter-free (activations)."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
        return False
    children = list(module[0].children())
    return any(isinstance(c, nn.Linear) for c in children) and all(
        isinstance(c, nn.Linear) or not any(True for _ in c.parameters()) for c in children
    )


def kept_by_role(model: nn.Module) -> dict[str, str]:
    """Linear modules that stay in full precision because of what they do, by name, with the reason.

    * a class that overrides ``nn.Linear.forward`` (Llama 4's router returns a tuple): a packed swap would
      change what it computes;
    * a router: a linear next to an experts module (same parent; a fused one with ``num_experts``, or a
      ``ModuleList`` of per-expert MLPs) with one output per expert;
    * a scalar gate: a linear next to an experts module with one output (``shared_expert_gate``).

    Routers and gates are tiny, decide which experts run, and every serving engine keeps them in full
    precision. Found by role (shape and position), not by name.
    """
    kept: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        counts = {
            int(m.num_experts)
            for m in parent.children()
            if isinstance(getattr(m, "num_experts", None), int) and not isinstance(m, nn.Linear)
        }
        counts |= {len(m) for m in parent.children() if _expert_list(m)}
        for child, m in parent.named_children():
            name = f"{parent_name}.{child}" if parent_name else child
            weight = getattr(m, "weight", None)
            if _overrides_forward(m):
                kept[name] = f"{type(m).__name__} overrides nn.Linear.forward"
            elif not isinstance(m, nn.Linear) and isinstance(weight, torch.Tensor) and weight.ndim == 2:
                if counts and weight.shape[0] in counts:  # e.g. a top-k router module holding [E, H]
                    kept[name] = "router (one output per expert)"
            elif isinstance(m, nn.Linear) and counts and m.out_features in counts:
                kept[name] = "router (one output per expert)"
            elif isinstance(m, nn.Linear) and counts and m.out_features == 1:
                kept[name] = "scalar gate (one output)"
    return kept


def select_quant_targets(model: nn.Module, ignore: list[str] | None) -> dict[str, nn.Linear]:
    """Linear modules to quantize, by in-memory name.

    ``ignore=None``: exactly the ``nn.Linear`` modules inside the decoder stack. Otherwise every
    ``nn.Linear`` of the model whose name matches none of ``ignore``. Either way, modules kept by role
    (:func:`kept_by_role`: routers, scalar gates, linears with their own forward) are left out.
    """
    kept = kept_by_role(model)
    if ignore is None:
        stack = find_decoder_stack(model)
        found = {f"{stack.path}.{n}": m for n, m in stack.layers.named_modules() if isinstance(m, nn.Linear)}
    else:
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not matches_any(n, ignore)}
    return {n: m for n, m in found.items() if n not in kept}


def ignore_regexes(all_linears: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """Regexes matching every name in ``all_linears`` not in ``quantized``, and none in ``quantized``.

    Written to survive the key renames transformers applies between memory and disk
    (``model.language_model.layers`` vs ``model.layers``, ``model.visual`` vs ``visual``): each skipped
    module is named by the first path segment that no quantized module has (``visual``, ``lm_head``),
    falling back to its path from the first segment that quantized modules do not share.
    """
    quantized = set(quantized)
    skipped = sorted(set(all_linears) - quantized)
    quant_segments = {seg for name in quantized for seg in name.split(".")}
    patterns: list[str] = []
    for name in skipped:
        if matches_any(name, patterns):
            continue
        segments = name.split(".")
        anchor = next((s for s in segments if s not in quant_segments), None)
        if anchor is not None:
            patterns.append(f"re:(.*\\.)?{re.escape(anchor)}(\\..*)?$")
        else:
            patterns.append(f"re:(.*\\.)?{re.escape('.'.join(segments[-4:]))}$")
    bad = [n for n in quantized if matches_any(n, patterns)]
    missed = [n for n in skipped if not matches_any(n, patterns)]
    if bad or missed:
        raise RuntimeError(f"ignore regexes {patterns} would quantize {missed} or skip {bad}")
    return patterns


def _facts(model: nn.Module) -> dict:
    return ARCH_FACTS.get(getattr(getattr(model, "config", None), "model_type", ""), {})


def find_final_norm(model: nn.Module, stack: DecoderStack) -> nn.Module:
    """The norm applied to the last decoder layer's output before ``lm_head``."""
    path = _facts(model).get("final_norm") or f"{stack.path.rpartition('.')[0]}.norm".lstrip(".")
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise NoDecoderStackError(
            f"No final norm at {path!r} in {type(model).__name__}; set tlq_hf.arch.ARCH_FACTS"
            f"[{getattr(model.config, 'model_type', '?')!r}]['final_norm'] to its dotted path."
        ) from err


def image_token_id(config) -> int | None:
    """The image token id of a VLM config (``None`` for a text-only model)."""
    for attr in IMAGE_TOKEN_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def smooth_mappings(model: nn.Module, layer: nn.Module) -> list[tuple[str, list[str]]]:
    """Resolved (producer, consumers) module names inside ``layer`` that can share a per-channel scale."""
    names = dict(layer.named_modules())
    resolved = []
    for producer_re, consumer_res in _facts(model).get("smooth_mappings", DEFAULT_SMOOTH_MAPPINGS):
        producer = _find(names, producer_re)
        consumers = [_find(names, c) for c in consumer_res]
        if producer is None or any(c is None for c in consumers):
            continue
        width = _out_width(names[producer])
        if width is None or any(getattr(names[c], "in_features", None) != width for c in consumers):
            continue
        resolved.append((producer, consumers))
    return resolved


def _find(names: dict[str, nn.Module], suffix_re: str) -> str | None:
    pattern = re.compile(rf"(.*\.)?{suffix_re}$")
    hits = [n for n in names if pattern.match(n)]
    return hits[0] if len(hits) == 1 else None


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.ndim == 1 else None


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` by ``new``, carrying over an accelerate hook if the old one had one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    hook = getattr(old, "_hf_hook", None)
    setattr(parent, child, new)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def decoder_device_map(model: nn.Module, decoder: str | int = "disk", rest: str | int = "cpu") -> dict[str, str | int]:
    """A ``device_map`` that puts every decoder layer on ``decoder`` and every other top module on ``rest``.

    ``model`` may be an empty (meta) model built from the config; e.g. ``decoder="disk"`` streams the decoder
    from the offload folder while the vision tower, embeddings and head stay in memory.
    """
    path = find_decoder_stack(model).path
    out: dict[str, str | int] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if name == path:
                out.update({f"{name}.{i}": decoder for i in range(len(child))})
            elif path.startswith(name + "."):
                walk(name + ".", child)
            else:
                out[name] = rest

    walk("", model)
    return out


def load_auto_class() -> type:
    """The Auto class that loads image-text-to-text models on this transformers: ``AutoModelForImageTextToText``
    where available (4.47+ and 5.x), else the older ``AutoModelForVision2Seq``."""
    import transformers

    auto_cls = getattr(transformers, "AutoModelForImageTextToText", None)
    return auto_cls if auto_cls is not None else transformers.AutoModelForVision2Seq
