"""The model card (``README.md``) every tlq_hf save writes, and the Hub upload that carries it.

The card says how the checkpoint was made and how to load it: base model, scheme, method and recipe,
calibration data (rows, tokens, image / text / answer split), importance settings, the per-layer error the
calibration reached, the tlq_hf version, and loading with plain transformers, with tlq_hf and with vLLM. Its
metadata (``base_model``, ``base_model_relation: quantized``, ``tags: [tlq, quantized, ...]``,
``library_name``, ``pipeline_tag``) is what the Hub indexes.

:func:`attach_card_writer` makes ``model.save_pretrained`` and ``model.push_to_hub`` of a model tlq_hf
quantized write the card (transformers' own ``push_to_hub`` replaces any ``README.md`` with a generic card,
so the upload is done here: save into a temporary folder, then one ``upload_folder`` commit).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn

from ..calibration.importance_kinds import IMPORTANCE_KINDS
from ..version import __version__
from .atomic import atomic_file, atomic_folder
from .base import FORMATS
from .canonical import canonicalize_safetensors

__all__ = ["attach_card_writer", "base_model_id", "model_card", "push_to_hub", "write_model_card"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(model: nn.Module) -> str | None:
    """The Hub id the model was loaded from (``config._name_or_path``), or ``None`` for a local folder."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    if not _HUB_ID.match(source) or os.path.exists(source):
        return None
    return source


def _tags(config: Any) -> list[str]:
    scheme = config.scheme
    fmt = FORMATS[config.save_format].tag
    return ["tlq", "quantized", f"{scheme.bits}-bit", scheme.name, config.method, fmt, "vision-language"]


def _layers_table(report: Any, limit: int = 16) -> list[str]:
    layers = list(getattr(report, "layers", []) or [])
    if not layers:
        return []
    lines = [
        "| decoder layer | error carried in | error after quantizing the layer |",
        "|---|---|---|",
    ]
    shown = layers if len(layers) <= limit else layers[: limit // 2] + layers[-limit // 2 :]
    for k, r in enumerate(shown):
        if len(layers) > limit and k == limit // 2:
            lines.append(f"| ... ({len(layers) - limit} more) | | |")
        lines.append(f"| {r.index} | {r.error_before:.3e} | {r.error_after:.3e} |")
    worst = max(layers, key=lambda r: r.error_after)
    lines += [
        "",
        f"Importance-weighted relative error of each decoder layer's output against the full-precision model on "
        f"the calibration tokens (the worst: layer {worst.index}, {worst.error_after:.3e}).",
    ]
    return lines


def _experts_rows(model: nn.Module, report: Any) -> list[str]:
    """MoE: how experts were written and calibrated, and what reloading them needs."""
    from ..experts import UnfusedExperts
    from .expert_keys import plain_reload_merges

    experts = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    if not experts:
        return []
    tokens = sorted(t for r in getattr(report, "layers", []) or [] for ts in r.expert_tokens.values() for t in ts)
    fallbacks = sum(len(r.fallbacks) for r in getattr(report, "layers", []) or [])
    rows = [
        f"| experts | {len(experts)} MoE layers x {len(experts[0])} experts, written per expert "
        "(`mlp.experts.N.gate_proj` / `up_proj` / `down_proj`, the names vLLM's MoE loaders read); routers and "
        "gates in full precision |"
    ]
    if tokens:
        rows.append(
            f"| calibration tokens per expert | min {tokens[0]}, median {tokens[len(tokens) // 2]}, max {tokens[-1]}; "
            f"{fallbacks} projections rounded to nearest for too few tokens |"
        )
    if not plain_reload_merges(model):
        rows.append(
            "| reloading | `import tlq_hf` before `from_pretrained`: this transformers' conversion for "
            f"`{model.config.model_type}` reads only fused expert keys; tlq_hf registers the per-expert merge |"
        )
    return rows


def model_card(model: nn.Module, repo_id: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The card of a model tlq_hf quantized (``model.hf_quantizer.quantization_config`` and ``model.tlq_report``)."""
    config = model.hf_quantizer.quantization_config
    report = getattr(model, "tlq_report", None)
    base = base_model_id(model)
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        tags=list(dict.fromkeys(_tags(config) + list(tags or []))),
        library_name="transformers",
        pipeline_tag="image-text-to-text",
    )
    source = base or Path(str(getattr(model.config, "_name_or_path", "") or "a local checkpoint")).name
    lines = [
        f"# {source} - {config.scheme.name} ({config.method.upper()})",
        "",
        f"Quantized with tlq_hf {__version__}: "
        + (
            "TLQ, token-level gradient-importance calibration for vision-language models (arXiv 2602.07899)."
            if config.method == "tlq"
            else f"the `{config.method}` baseline of the same pipeline."
        ),
        "",
        "## Quantization",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base or source} |",
        *_quantization_rows(model, config, report),
    ]
    table = _layers_table(report)
    if table:
        lines += ["", "## Calibration error per layer", "", *table]
    lines += ["", "## Use", "", *FORMATS[config.save_format].usage(repo_id or "path/to/this-folder", config.scheme)]
    lines += _recreate_lines(config, base)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _quantization_rows(model: nn.Module, config: Any, report: Any) -> list[str]:
    """The card's quantization table below its base-model row: scheme, coverage, experts, format, method, settings
    and calibration data."""
    scheme, recipe = config.scheme, getattr(report, "recipe", None)
    rows = [
        f"| scheme | {scheme.name}: {scheme.description} |",
        "| quantized | the linear layers of the language-model decoder "
        + (
            "(vision tower, projector and `lm_head` in full precision)"
            if config.ignore is None
            else f"(ignore {config.ignore})"
        )
        + " |",
        *([f"| decoder coverage | {report.coverage.summary()} |"] if getattr(report, "coverage", None) else []),
        *_experts_rows(model, report),
        f"| format | {config.save_format} |",
        f"| method | `{config.method}`"
        + (
            f": importance `{recipe.importance}`, solver `{recipe.solver}`, smoothing `{recipe.smoothing}`, "
            f"{'exposed' if recipe.exposed else 'full-precision'} layer inputs"
            if recipe is not None
            else ""
        )
        + " |",
        f"| GPTQ settings | damp {config.damp}, act_order {config.act_order} |",
    ]
    if recipe is not None and recipe.importance is not None and IMPORTANCE_KINDS[recipe.importance].from_gradient:
        rows.append(
            f"| token importance | `{recipe.importance}` at the `{config.importance_labels}` labels of "
            f"{config.answer_tokens} answer tokens, per {config.importance_scope}; tempering gamma {config.gamma}, "
            f"clip {tuple(config.importance_clip)}, uniform mix {config.uniform_mix}, token fraction "
            f"{config.token_fraction} |"
        )
    if report is not None and report.samples:
        text = report.tokens - report.vision_tokens
        rows.append(
            f"| calibration data | {report.samples} rows, {report.tokens} tokens: {report.vision_tokens} image "
            f"({report.vision_tokens / max(report.tokens, 1):.0%}), {text} text, of which {report.answer_tokens} "
            f"answer tokens; max_length {config.max_length}, seed {config.seed} |"
        )
        if report.answer_loss is not None:
            rows.append(f"| full-precision answer loss | {report.answer_loss:.4f} |")
    return rows


def _recreate_lines(config: Any, base: str | None) -> list[str]:
    """How to make the same checkpoint again with tlq_hf (the config fields that differ from the defaults)."""
    changed = _changed_fields(config)
    return [
        "",
        "Re-create it with tlq_hf:",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText",
        "from tlq_hf import TLQConfig",
        f"config = TLQConfig({', '.join(f'{k}={v!r}' for k, v in changed.items())}"
        + (", " if changed else "")
        + "dataset=my_rows)",
        f'model = AutoModelForImageTextToText.from_pretrained("{base or "BASE_MODEL"}", quantization_config=config)',
        "```",
        "",
    ]


def _changed_fields(config: Any) -> dict[str, Any]:
    """The config fields that differ from ``TLQConfig()``'s (the recipe a user types)."""
    default = type(config)().to_dict()
    return {k: v for k, v in config.to_dict().items() if k != "tlq_version" and default.get(k) != v}


def write_model_card(
    model: nn.Module, folder: str | os.PathLike, repo_id: str | None = None, tags: list[str] | None = None
) -> Path:
    """Write ``README.md`` into ``folder`` (atomically: a temporary name, then a rename)."""
    path = Path(folder) / "README.md"
    with atomic_file(path) as tmp:
        model_card(model, repo_id, tags).save(tmp)
    return path


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    processor: Any = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    tags: list[str] | str | None = None,
    api: HfApi | None = None,
    **save_kwargs: Any,
) -> Any:
    """Save the quantized model (weights, config, card; ``processor`` too when given) into a temporary folder
    and upload it to ``repo_id`` in one commit; ``tags`` are added to the card's. Returns ``HfApi.upload_folder``'s
    commit info. ``api``: the Hub client (default ``HfApi(token=token)``; e.g. one for another endpoint). Other
    keywords go to ``save_pretrained`` (e.g. ``max_shard_size``). (Its parameters mirror transformers'
    ``push_to_hub``.)"""
    save_kwargs.pop("use_temp_dir", None)  # transformers' push_to_hub option: a temporary folder is always used
    tags = [tags] if isinstance(tags, str) else tags
    scheme_name = model.hf_quantizer.quantization_config.scheme.name
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        write_model_card(model, folder, repo_id, tags)  # the card names the repo in its loading snippets
        if processor is not None:
            processor.save_pretrained(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {scheme_name} model (tlq_hf)",
            create_pr=create_pr,
            revision=revision,
            repo_type="model",
        )


def attach_card_writer(model: nn.Module) -> None:
    """Make this model's ``save_pretrained`` atomic (:func:`~tlq_hf.formats.atomic.atomic_folder`) and also write
    the card, and its ``push_to_hub`` upload the card with the weights (:func:`push_to_hub`). Instance
    attributes: the class and every other model are untouched."""
    save = model.save_pretrained  # the class's bound method

    @functools.wraps(save)
    def save_pretrained(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save_pretrained(push_to_hub=True) would replace tlq_hf's model card; use model.push_to_hub(repo_id)."
            )
        if not kwargs.get("is_main_process", True):
            return save(save_directory, *args, **kwargs)
        with atomic_folder(save_directory) as folder:  # a save killed half-way leaves the old checkpoint
            out = save(folder, *args, **kwargs)
            canonicalize_safetensors(folder)  # same input, same bytes
            write_model_card(model, folder)
        return out

    @functools.wraps(push_to_hub)
    def push(repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("push_to_hub(repo_id, ...) takes its options as keywords")
        return push_to_hub(model, repo_id, **kwargs)

    model.save_pretrained = save_pretrained
    model.push_to_hub = push
