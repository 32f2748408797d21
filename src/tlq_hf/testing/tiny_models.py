"""Tiny random-weight vision-language models of real architectures, built offline.

The builders here create small models (a 2-layer, 256-wide decoder and a 2-layer,
64-wide vision tower) of real Hugging Face VLM architectures together with a
locally built word-level tokenizer, image/video processors and a chat template.
Everything is saved with ``save_pretrained`` so that the directory can be loaded
through the Auto classes exactly like a Hub checkpoint, without network access.

Works with transformers 4.57.x and 5.x; differences between the two lines are
handled by feature detection. Build under the transformers line that will load
the directory: on 4.x the Qwen processors require ``Qwen2TokenizerFast``, which
transformers 5 would reload as a re-built ``Qwen2Tokenizer`` (words become ``<unk>``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import BatchFeature, PreTrainedTokenizerFast

from ..arch import load_auto_class

__all__ = [
    "FAMILIES",
    "MOE_FAMILIES",
    "build_tiny_vlm",
    "build_vlm",
    "load_auto_class",
    "make_inputs",
    "sample_images",
    "sample_rows",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# Shared dimensions
# --------------------------------------------------------------------------- #

#: Decoder dimensions shared by every family. All decoder linears then have
#: in_features in {256, 512}, i.e. multiples of 128.
_TEXT_DIMS: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
_HEAD_DIM = _TEXT_DIMS["hidden_size"] // _TEXT_DIMS["num_attention_heads"]
#: Multimodal RoPE split of head_dim // 2 frequencies into (temporal, height, width),
#: same 2:3:3 proportions as the released Qwen2-VL checkpoints ([16, 24, 24] for 128).
_MROPE_SECTION = [_HEAD_DIM // 8, _HEAD_DIM * 3 // 16, _HEAD_DIM * 3 // 16]
_ROPE_THETA = 1_000_000.0

#: Square side (pixels) of the images the vision towers are built around.
_IMAGE_SIDE = 64
#: Qwen vision patching: 8px patches merged 2x2 -> one token per 16x16 pixels.
_QWEN_PATCH = 8
_QWEN_MERGE = 2
_QWEN_FACTOR = _QWEN_PATCH * _QWEN_MERGE
#: Qwen pixel budget: a 64x64 image keeps its size (16 tokens); the largest
#: images are shrunk to 128x128 pixels (64 tokens).
_QWEN_MIN_PIXELS = (2 * _QWEN_FACTOR) ** 2
_QWEN_MAX_PIXELS = (2 * _IMAGE_SIDE) ** 2
#: CLIP / SigLIP patching for the LLaVA families: 16px patches on 64x64 inputs.
_VIT_PATCH = 16

_INIT_STD = 0.02
_VOCAB_MULTIPLE = 64

# --------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------- #

_PUNCTUATION = tuple(".,?!:;'\"-()[]/")
_DIGITS = tuple("0123456789")
#: Common lowercase English words (the tokenizer lowercases its input).
_WORDS = tuple(
    """
    a about above across after again against all almost alone along already also always am among an and
    animal another answer any anything are area around as ask at away back background bad be beautiful
    because bed been before behind being below best better between big bird black blue board boat body
    book both bottom box boy bright brown building but by cake can car cat center chair child children
    city clear close clothes cloud coffee color colors come could count cup dark day describe described
    description detail detailed details did different do does dog door down draw each earth eat empty
    end enough even evening every everything explain eye eyes face far few field find fine first five
    floor flower flowers food for four from front full game girl give glass go good grass gray great green
    ground group had hair half hand happy has hat have he head hello help her here high him his hold home
    horse hot house how i if image images in inside is it its just keep kind know lady large last left
    less life light like line little long look looking made make man many may me mean mountain much
    must my name near need new next night no not nothing now number object objects of off old on one only
    open or orange other our out outside over paper part people person photo photograph picture pictures
    pink place plant play please point provide purple question red right river road rocket room round
    say scene sea see seen shape short should show shown side sign simple sit sitting sky small smile snow
    so some something space square stand standing still street suit sun table take tell text than that
    the their them then there these they thing things think this those three through time to top tree
    trees two under up us use very view visible wall want was water way we wear wearing well were what
    when where which while white who why wide window with woman word words would write yellow yes you
    young your helpful assistant system user
    """.split()
)

# --------------------------------------------------------------------------- #
# Chat templates
# --------------------------------------------------------------------------- #

_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Gemma 3's template: ``<bos>``, turns as ``<start_of_turn>{user|model}``, a leading system message folded into the
#: first user turn, and ``<start_of_image>`` wherever the message has an image (the processor expands it).
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# --------------------------------------------------------------------------- #
# Per-family facts
# --------------------------------------------------------------------------- #


def _rope_kwargs(theta: float, **extra: Any) -> dict[str, Any]:
    """RoPE settings in the form the installed transformers expects.

    transformers 5 has a single ``rope_parameters`` dict (with ``rope_theta`` inside);
    4.x uses ``rope_theta`` plus an optional ``rope_scaling`` dict carrying ``type``.
    """
    if hasattr(transformers.modeling_rope_utils, "RopeParameters"):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **extra}}
    if not extra:
        return {"rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": {"type": "mrope", **extra}}


def _mrope_section(text: dict[str, Any]) -> list[int]:
    """The 2:3:3 (temporal, height, width) M-RoPE split of ``text``'s head_dim // 2 frequencies."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if head_dim == _HEAD_DIM:
        return list(_MROPE_SECTION)
    if head_dim % 16:
        raise ValueError(f"M-RoPE needs a head_dim divisible by 16, got {head_dim}")
    return [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]


def _qwen_text_config(text: dict[str, Any]) -> dict[str, Any]:
    return {**text, **_rope_kwargs(_ROPE_THETA, mrope_section=_mrope_section(text))}


def _qwen2_vl_config(text: dict[str, Any]) -> dict[str, Any]:
    return {
        "text_config": _qwen_text_config(text),
        "vision_config": {
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": text["hidden_size"],  # merger output = text width
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": _QWEN_PATCH,
            "spatial_merge_size": _QWEN_MERGE,
            "temporal_patch_size": 2,
        },
    }


def _qwen_vision(depth: int, text: dict[str, Any]) -> dict[str, Any]:
    """The vision tower every tiny Qwen-VL shares (Qwen2.5-VL and Qwen3-VL add their own keys)."""
    return {
        "depth": depth,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": text["hidden_size"],
        "patch_size": _QWEN_PATCH,
        "spatial_merge_size": _QWEN_MERGE,
        "temporal_patch_size": 2,
    }


def _qwen2_5_vl_config(text: dict[str, Any]) -> dict[str, Any]:
    depth = 2
    return {
        "text_config": _qwen_text_config(text),
        "vision_config": {
            **_qwen_vision(depth, text),
            # 32px windows = 2x2 merged tokens, so a 64x64 image has 4 windows;
            # the last block uses full attention as in the released models.
            "window_size": 2 * _QWEN_FACTOR,
            "fullatt_block_indexes": [depth - 1],
            "tokens_per_second": 2,
        },
    }


#: Qwen3-VL-MoE: 4 experts, top-2, expert width 128 (a multiple of the 128-column groups' input widths).
_MOE_TEXT = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "decoder_sparse_step": 1}


def _qwen3_vl_moe_config(text: dict[str, Any]) -> dict[str, Any]:
    text = {**_MOE_TEXT, "head_dim": text["hidden_size"] // text["num_attention_heads"], **text}
    return {
        "text_config": _qwen_text_config(text),
        "vision_config": {
            **_qwen_vision(2, text),
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],  # adds tower layer 1's features to the text after decoder layer 0
        },
    }


def _vit_config(model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": _IMAGE_SIDE,
        "patch_size": _VIT_PATCH,
    }


def _llava_config(text: dict[str, Any]) -> dict[str, Any]:
    return {
        "text_config": {"model_type": "llama", **text, **_rope_kwargs(10_000.0)},
        "vision_config": {**_vit_config("clip_vision_model"), "projection_dim": 64},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": (_IMAGE_SIDE // _VIT_PATCH) ** 2,
    }


#: Any-resolution grid for LLaVA-OneVision, kept at 1-2 tiles per side so that the
#: number of image tokens stays small.
_ONEVISION_PINPOINTS = [[_IMAGE_SIDE * h, _IMAGE_SIDE * w] for h in (1, 2) for w in (1, 2)]


def _llava_onevision_config(text: dict[str, Any]) -> dict[str, Any]:
    return {
        "text_config": {"model_type": "qwen2", **text, **_rope_kwargs(_ROPE_THETA)},
        "vision_config": _vit_config("siglip_vision_model"),
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": _ONEVISION_PINPOINTS,
    }


#: Gemma 3: every second decoder layer attends globally (the released models: every sixth), the others
#: within a sliding window shorter than the tiny sequences (about 16 image + 20 text tokens), so that
#: both attention kinds and both RoPE bases are exercised.
_GEMMA3_GLOBAL_EVERY = 2
_GEMMA3_SLIDING_WINDOW = 16
_GEMMA3_ROPE_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
#: SigLIP tower with 8px patches (8 x 8 patches on 64 x 64 images), average-pooled 2 x 2 by the
#: projector into 16 image tokens per image.
_GEMMA3_PATCH = 8
_GEMMA3_IMAGE_TOKENS = 16


def _gemma3_rope_kwargs() -> dict[str, Any]:
    """Gemma 3's two RoPE bases (global layers, sliding layers) in the form the installed transformers expects.

    transformers 5 keys ``rope_parameters`` by layer type; 4.x has ``rope_theta`` (global) and
    ``rope_local_base_freq`` (sliding).
    """
    if hasattr(transformers.modeling_rope_utils, "RopeParameters"):
        return {
            "rope_parameters": {
                kind: {"rope_type": "default", "rope_theta": theta} for kind, theta in _GEMMA3_ROPE_THETA.items()
            }
        }
    return {
        "rope_theta": _GEMMA3_ROPE_THETA["full_attention"],
        "rope_local_base_freq": _GEMMA3_ROPE_THETA["sliding_attention"],
    }


def _gemma3_layer_types(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(num_layers)]


def _gemma3_config(text: dict[str, Any]) -> dict[str, Any]:
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return {
        "text_config": {
            "model_type": "gemma3_text",
            **text,
            **_gemma3_rope_kwargs(),
            "tie_word_embeddings": True,
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": _GEMMA3_SLIDING_WINDOW,
            "layer_types": _gemma3_layer_types(text["num_hidden_layers"]),
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        },
        "vision_config": {
            **_vit_config("siglip_vision_model"),
            "patch_size": _GEMMA3_PATCH,
            "vision_use_head": False,
            "layer_norm_eps": 1e-6,
        },
        "mm_tokens_per_image": _GEMMA3_IMAGE_TOKENS,
        "tie_word_embeddings": True,
    }


_GEMMA3_SPECIAL = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

_QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
_QWEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
_QWEN_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_QWEN_PIXELS = {
    "min_pixels": _QWEN_MIN_PIXELS,
    "max_pixels": _QWEN_MAX_PIXELS,
    "patch_size": _QWEN_PATCH,
    "merge_size": _QWEN_MERGE,
    "temporal_patch_size": 2,
}
_ONEVISION_MEDIA = {"size": {"height": _IMAGE_SIDE, "width": _IMAGE_SIDE}}


@dataclass(frozen=True)
class _FamilySpec:
    """Everything needed to build one family: class names plus config/processor facts."""

    model_class: str
    processor_class: str
    image_processor: tuple[str, dict[str, Any]]
    video_processor: tuple[str, dict[str, Any]] | None
    special_tokens: tuple[str, ...]
    roles: dict[str, str]  # tokenizer role (bos_token, eos_token, ...) -> token
    token_id_fields: dict[str, str]  # model-config field -> token
    chat_template: str
    model_config: Callable[[dict[str, Any]], dict[str, Any]]
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    add_bos: bool = False
    # tokenizer attributes naming further special tokens (Gemma 3's ``boi_token``, ``image_token``, ...)
    named_tokens: dict[str, str] = field(default_factory=dict)
    words: tuple[str, ...] = ()  # words the chat template needs beyond the shared vocabulary
    # oldest transformers major line the family is built on (Qwen3-VL-MoE: its 4.57 experts predate the
    # experts interface, which tlq_hf's MoE support reads)
    min_major: int = 4


_QWEN2_VL = _FamilySpec(
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    image_processor=("Qwen2VLImageProcessor", _QWEN_PIXELS),
    video_processor=("Qwen2VLVideoProcessor", _QWEN_PIXELS),
    special_tokens=_QWEN_SPECIAL,
    roles=_QWEN_ROLES,
    token_id_fields=_QWEN_TOKEN_FIELDS,
    chat_template=_QWEN_CHAT_TEMPLATE,
    model_config=_qwen2_vl_config,
)

_FAMILY_SPECS: dict[str, _FamilySpec] = {
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": dataclasses.replace(
        _QWEN2_VL,
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        model_config=_qwen2_5_vl_config,
    ),
    "llava": _FamilySpec(
        model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        image_processor=(
            "CLIPImageProcessor",
            {"size": {"shortest_edge": _IMAGE_SIDE}, "crop_size": {"height": _IMAGE_SIDE, "width": _IMAGE_SIDE}},
        ),
        video_processor=None,
        special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
        roles={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        token_id_fields={"image_token_index": "<image>"},
        chat_template=_LLAVA_CHAT_TEMPLATE,
        model_config=_llava_config,
        processor_kwargs={
            "patch_size": _VIT_PATCH,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,  # the CLIP class token
        },
        add_bos=True,
    ),
    "llava_onevision": _FamilySpec(
        model_class="LlavaOnevisionForConditionalGeneration",
        processor_class="LlavaOnevisionProcessor",
        image_processor=(
            "LlavaOnevisionImageProcessor",
            {**_ONEVISION_MEDIA, "image_grid_pinpoints": _ONEVISION_PINPOINTS},
        ),
        video_processor=("LlavaOnevisionVideoProcessor", _ONEVISION_MEDIA),
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"),
        roles=_QWEN_ROLES,
        token_id_fields={"image_token_index": "<image>", "video_token_index": "<video>"},
        chat_template=_ONEVISION_CHAT_TEMPLATE,
        model_config=_llava_onevision_config,
        processor_kwargs={
            "num_image_tokens": (_IMAGE_SIDE // _VIT_PATCH) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    ),
    "gemma3": _FamilySpec(
        model_class="Gemma3ForConditionalGeneration",
        processor_class="Gemma3Processor",
        image_processor=(
            "Gemma3ImageProcessor",
            {"size": {"height": _IMAGE_SIDE, "width": _IMAGE_SIDE}, "do_pan_and_scan": False},
        ),
        video_processor=None,
        special_tokens=_GEMMA3_SPECIAL,
        roles={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        token_id_fields={
            "image_token_index": "<image_soft_token>",
            "boi_token_index": "<start_of_image>",
            "eoi_token_index": "<end_of_image>",
        },
        chat_template=_GEMMA3_CHAT_TEMPLATE,
        model_config=_gemma3_config,
        processor_kwargs={"image_seq_length": _GEMMA3_IMAGE_TOKENS},
        add_bos=True,
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        words=("model",),
    ),
}

#: Names accepted by :func:`build_tiny_vlm`.
_FAMILY_SPECS["qwen3_vl_moe"] = dataclasses.replace(
    _FAMILY_SPECS["qwen2_5_vl"],  # the Qwen tokenizer, pixels and chat template
    model_class="Qwen3VLMoeForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    video_processor=("Qwen3VLVideoProcessor", _QWEN_PIXELS),
    model_config=_qwen3_vl_moe_config,
    min_major=5,
)

_BUILDABLE = tuple(
    f
    for f, spec in _FAMILY_SPECS.items()
    if hasattr(transformers, spec.model_class) and int(transformers.__version__.split(".")[0]) >= spec.min_major
)
#: Dense families (the generic per-family tests) and MoE families (tests/test_moe.py) built here.
MOE_FAMILIES: tuple[str, ...] = tuple(f for f in _BUILDABLE if "moe" in f)
FAMILIES: tuple[str, ...] = tuple(f for f in _BUILDABLE if f not in MOE_FAMILIES)

# --------------------------------------------------------------------------- #
# Builders
# --------------------------------------------------------------------------- #


def _transformers_class(name: str) -> Any:
    try:
        return getattr(transformers, name)
    except AttributeError as exc:
        raise ImportError(f"transformers {transformers.__version__} has no {name}") from exc


def _tokenizer_class(processor_cls: type) -> type[PreTrainedTokenizerFast]:
    """The fast-tokenizer class to wrap the word-level backend in.

    transformers 4.x processors declare (and type-check) the tokenizer class they
    accept, e.g. ``("Qwen2Tokenizer", "Qwen2TokenizerFast")``, and reload with that
    class; such fast classes wrap any ``tokenizer.json`` unchanged in 4.x. transformers 5
    drops the declaration, and there the generic class must be used because
    model-specific tokenizers rebuild their pre-tokenizer on reload.
    """
    declared = getattr(processor_cls, "tokenizer_class", None)
    names = declared if isinstance(declared, (tuple, list)) else (declared,)
    fast_names = [name for name in names if isinstance(name, str) and name.endswith("Fast")]
    return _transformers_class(fast_names[0]) if fast_names else PreTrainedTokenizerFast


def _build_tokenizer(spec: _FamilySpec, extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over ``special tokens + punctuation + digits + words + extra words``."""
    extra = (word.lower() for word in (*spec.words, *extra_words))
    tokens = list(dict.fromkeys((*spec.special_tokens, *_PUNCTUATION, *_DIGITS, *_WORDS, *extra)))
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(WordLevel(vocab, unk_token=spec.roles["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens])
    if spec.add_bos:
        bos = spec.roles["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
        )
    role_tokens = set(spec.roles.values())
    tokenizer_cls = _tokenizer_class(_transformers_class(spec.processor_class))
    named = {"extra_special_tokens": dict(spec.named_tokens)} if spec.named_tokens else {}
    return tokenizer_cls(
        tokenizer_object=backend,
        **spec.roles,
        **named,
        additional_special_tokens=[t for t in spec.special_tokens if t not in role_tokens],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=_TEXT_DIMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def _build_processor(spec: _FamilySpec, tokenizer: PreTrainedTokenizerFast) -> Any:
    image_cls, image_kwargs = spec.image_processor
    parts: dict[str, Any] = {"image_processor": _transformers_class(image_cls)(**image_kwargs)}
    if spec.video_processor is not None:
        video_cls, video_kwargs = spec.video_processor
        parts["video_processor"] = _transformers_class(video_cls)(**video_kwargs)
    processor_cls = _transformers_class(spec.processor_class)
    return processor_cls(tokenizer=tokenizer, chat_template=spec.chat_template, **parts, **spec.processor_kwargs)


def _build_config(
    spec: _FamilySpec,
    tokenizer: PreTrainedTokenizerFast,
    text_overrides: Mapping[str, Any] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The model config; the overrides update the text dimensions, the ``vision_config`` dict and the
    top-level fields of the family's defaults."""
    vocab_size = -(-len(tokenizer) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    text = {
        **_TEXT_DIMS,
        **(text_overrides or {}),
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in spec.token_id_fields.items()}
    config_cls = _transformers_class(spec.model_class).config_class
    fields = {"tie_word_embeddings": False, **spec.model_config(text)}
    if vision_overrides:
        fields["vision_config"] = {**fields["vision_config"], **vision_overrides}
    fields.update(config_overrides or {})
    return config_cls(**fields, **token_ids)


@torch.no_grad()
def _reinit_degenerate_parameters(model: torch.nn.Module, std: float) -> list[str]:
    """Give constant weight matrices (e.g. zero-initialised ones) a N(0, std) init.

    Some architectures zero-initialise parts of their projector or vision tower,
    which would make the image irrelevant to the logits of a random model.
    Returns the names of the parameters that were re-initialised.
    """
    touched = []
    for name, param in model.named_parameters():
        if param.ndim >= 2 and param.is_floating_point() and bool((param == param.flatten()[0]).all()):
            param.normal_(0.0, std)
            touched.append(name)
    return touched


#: Sentence of in-vocabulary words used to check the saved tokenizer.
_ROUND_TRIP_SENTENCE = "What is shown in this picture? Describe the colors, please."


def _check_saved_tokenizer(path: str, tokenizer: PreTrainedTokenizerFast) -> None:
    """Reload the tokenizer from ``path`` and check that it matches ``tokenizer``.

    Guards against transformers versions whose model-specific tokenizer classes
    rebuild the pre-tokenizer on load (known words would become ``<unk>``).
    """
    reloaded = transformers.AutoTokenizer.from_pretrained(path)
    expected = tokenizer(_ROUND_TRIP_SENTENCE)["input_ids"]
    actual = reloaded(_ROUND_TRIP_SENTENCE)["input_ids"]
    if actual != expected or reloaded.unk_token_id in actual:
        raise RuntimeError(
            f"tokenizer saved at {path} does not round-trip: {type(reloaded).__name__} gives "
            f"{reloaded.convert_ids_to_tokens(actual)}, expected {tokenizer.convert_ids_to_tokens(expected)}"
        )


def _set_generation_ids(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        return
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id


def _spec(family: str) -> _FamilySpec:
    try:
        return _FAMILY_SPECS[family]
    except KeyError:
        raise ValueError(f"Unknown tiny VLM family {family!r}; valid families: {', '.join(_BUILDABLE)}") from None


def build_tiny_vlm(family: str, path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """Build a tiny random VLM of ``family`` and save model + processor to ``path``.

    The directory can then be loaded with :func:`load_auto_class` ``().from_pretrained(path)``
    and ``AutoProcessor.from_pretrained(path)``. Builds are deterministic in ``seed``
    and do not disturb the caller's global RNG state.

    Raises:
        ValueError: if ``family`` is not one of :data:`FAMILIES`.
    """
    spec = _spec(family)

    tokenizer = _build_tokenizer(spec)
    processor = _build_processor(spec, tokenizer)
    config = _build_config(spec, tokenizer)
    model_cls = _transformers_class(spec.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        reinitialised = _reinit_degenerate_parameters(model, std=_INIT_STD)
    if reinitialised:
        logger.debug("%s: re-initialised constant parameters %s", family, reinitialised)
    model = model.to(dtype=dtype).eval()
    _set_generation_ids(model, tokenizer)

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _check_saved_tokenizer(path, tokenizer)
    logger.info(
        "Built tiny %s (%.2fM parameters, %s) at %s",
        family,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        path,
    )
    return path


def build_vlm(
    family: str,
    *,
    extra_words: Sequence[str] = (),
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    image_processor: Mapping[str, Any] | None = None,
    processor: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised float32 VLM of ``family`` and its processor, in memory, customised.

    The tokenizer, chat template and processor are built exactly as in :func:`build_tiny_vlm`; on top:

    * ``extra_words`` are appended to the word-level vocabulary (lowercased);
    * ``text`` overrides the decoder dimensions (``hidden_size``, ``num_hidden_layers``, ...);
    * ``vision`` updates the ``vision_config`` dict and ``config`` the top-level config fields
      (e.g. LLaVA's ``image_seq_length``);
    * ``image_processor`` updates the image processor's kwargs (and the video processor's, for the keys
      it shares with them) and ``processor`` the processor's kwargs (e.g. LLaVA's ``patch_size``).

    Nothing is saved: train the model, then ``save_pretrained`` both. With no overrides the model equals
    the one :func:`build_tiny_vlm` saves for the same ``seed``.

    Raises:
        ValueError: if ``family`` is not one of :data:`FAMILIES`.
    """
    spec = _spec(family)
    image_overrides = dict(image_processor or {})
    image_cls, image_kwargs = spec.image_processor
    video = spec.video_processor
    if video is not None:
        shared = {k: v for k, v in image_overrides.items() if k in video[1]}
        video = (video[0], {**video[1], **shared})
    spec = dataclasses.replace(
        spec,
        image_processor=(image_cls, {**image_kwargs, **image_overrides}),
        video_processor=video,
        processor_kwargs={**spec.processor_kwargs, **(processor or {})},
    )
    tokenizer = _build_tokenizer(spec, extra_words)
    built_processor = _build_processor(spec, tokenizer)
    model_config = _build_config(spec, tokenizer, text, vision, config)
    model_cls = _transformers_class(spec.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(model_config)
        _reinit_degenerate_parameters(model, std=_INIT_STD)
    _set_generation_ids(model, tokenizer)
    return model.eval(), built_processor


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #

#: Photographs bundled with scikit-image (no download needed), in sampling order.
_SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "page",
    "text",
)


@functools.cache
def _skimage_photo(name: str, size: int) -> Image.Image:
    from skimage import data

    array = np.asarray(getattr(data, name)())
    image = Image.fromarray(array).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC)


def sample_images(n: int, size: int = 64) -> list[Image.Image]:
    """``n`` deterministic real photographs from ``skimage.data`` as ``size`` x ``size`` RGB images.

    Each photo is centre-cropped to a square and resized; the list cycles through
    the available photos when ``n`` exceeds their number.
    """
    if n < 0 or size <= 0:
        raise ValueError(f"need n >= 0 and size > 0, got n={n}, size={size}")
    names = [_SKIMAGE_PHOTOS[i % len(_SKIMAGE_PHOTOS)] for i in range(n)]
    return [_skimage_photo(name, size).copy() for name in names]


def make_inputs(
    processor: Any,
    images: Sequence[Image.Image | Sequence[Image.Image]],
    prompts: Sequence[str],
) -> BatchFeature:
    """Batch model inputs for ``prompts[i]`` about ``images[i]`` via the processor's chat template.

    ``images[i]`` is one image or a sequence of images for the i-th prompt. Each pair
    becomes a single user turn (image entries, then the text) rendered with
    ``add_generation_prompt=True``, and the batch is padded with the tokenizer's
    padding side. Images go to the processor per prompt (a list of lists), the batched
    form every processor reads the same way.
    """
    from ..data import rendered_text_kwargs

    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} image entries for {len(prompts)} prompts")
    per_prompt = [[item] if isinstance(item, Image.Image) else list(item) for item in images]
    texts = []
    for prompt_images, prompt in zip(per_prompt, prompts):
        content = [{"type": "image"} for _ in prompt_images] + [{"type": "text", "text": prompt}]
        conversation = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    return processor(
        text=texts, images=per_prompt, return_tensors="pt", padding=True, **rendered_text_kwargs(processor, texts)
    )


# Short question/answer pairs about the photos that ship in ``skimage.data`` (same order as
# :func:`sample_images`), for demos and tests that must run offline.
_PHOTO_ANSWERS = (
    "a person in a white suit",
    "a cup of coffee",
    "a cat",
    "a rocket",
    "a man with a camera",
    "many old coins",
    "the moon",
    "a clock on the wall",
    "many stars in the sky",
    "cells under a microscope",
    "a page of text",
    "black text on white",
)
_QUESTIONS = ("what is in the picture", "describe the image in a few words", "what do you see")


def sample_rows(n: int, size: int = 64, seed: int = 0) -> list[dict]:
    """``n`` offline calibration rows: real ``skimage.data`` photos with a question and a short answer."""
    rng = random.Random(seed)
    images = sample_images(n, size)
    return [
        {"image": img, "question": rng.choice(_QUESTIONS), "answer": _PHOTO_ANSWERS[i % len(_PHOTO_ANSWERS)]}
        for i, img in enumerate(images)
    ]
