"""Tests for the tiny random VLM builders (run on transformers 4.57.x and 5.x)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from tlq_hf.testing.tiny_models import FAMILIES, build_tiny_vlm, load_auto_class, make_inputs, sample_images

PROMPTS = ["Describe this image.", "What is the color of the sky?"]
KNOWN_SENTENCE = "What is shown in this picture? Describe the colors, please."


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    path = tmp_path_factory.mktemp(family)
    assert build_tiny_vlm(family, path, seed=0) == str(path)
    return family, path


@pytest.fixture(scope="module")
def loaded(built):
    family, path = built
    model = load_auto_class().from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return family, model, processor


def _image_token_id(model) -> int:
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    return token_id if token_id is not None else config.image_token_index


def _image_placeholder(processor) -> str:
    """The token the image features replace: the tokenizer's ``image_token`` where it names one (Gemma 3, whose
    processor calls the ``<start_of_image>`` marker its image token), else the processor's."""
    return getattr(processor.tokenizer, "image_token", None) or processor.image_token


def test_forward_is_finite_and_depends_on_image(loaded):
    family, model, processor = loaded
    images = sample_images(3)
    inputs = make_inputs(processor, images[:2], PROMPTS)
    swapped = make_inputs(processor, [images[0], images[2]], PROMPTS)
    assert torch.equal(inputs["input_ids"], swapped["input_ids"])

    with torch.no_grad():
        logits = model(**inputs).logits
        swapped_logits = model(**swapped).logits

    batch, seq_len = inputs["input_ids"].shape
    assert batch == 2
    assert logits.shape[:2] == (batch, seq_len)
    assert logits.shape[-1] >= len(processor.tokenizer)
    assert torch.isfinite(logits).all()

    image_tokens = (inputs["input_ids"] == _image_token_id(model)).sum(dim=1)
    assert (image_tokens > 0).all() and (image_tokens <= 64).all(), f"{family}: {image_tokens.tolist()}"
    # Only the second sample's image changed: its logits move, the first sample's do not.
    torch.testing.assert_close(swapped_logits[0], logits[0], rtol=1e-4, atol=1e-4)
    assert (swapped_logits[1] - logits[1]).abs().max() > 1e-3


def test_tokenizer_round_trip(loaded):
    family, model, processor = loaded
    tokenizer = processor.tokenizer
    ids = tokenizer(KNOWN_SENTENCE, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "what is shown in this picture ? describe the colors , please ."
    assert tokenizer.pad_token_id is not None
    assert len(tokenizer) <= model.config.get_text_config().vocab_size
    assert tokenizer.convert_tokens_to_ids(_image_placeholder(processor)) == _image_token_id(model)
    assert tokenizer.padding_side == "left"


def test_chat_template(loaded):
    family, _, processor = loaded
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    rendered = processor.apply_chat_template(conversation, tokenize=False)
    with_prompt = processor.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False)
    # the image marker the template writes: the image token, Qwen's vision start, or Gemma 3's <start_of_image>
    markers = {processor.image_token, "<|vision_start|>", getattr(processor, "boi_token", None)} - {None}
    assert any(marker in rendered for marker in markers)
    assert "What is this?" in rendered and "A cat." in rendered
    assert len(with_prompt) > len(processor.apply_chat_template(conversation[:1], tokenize=False))
    assert processor.tokenizer.unk_token_id not in processor.tokenizer(rendered)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(family, tmp_path):
    weights = [
        load_file(Path(build_tiny_vlm(family, tmp_path / name, seed=seed)) / "model.safetensors")
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    first, same_seed, other_seed = weights
    assert first.keys() == same_seed.keys() == other_seed.keys()
    assert all(torch.equal(first[key], same_seed[key]) for key in first)
    assert any(not torch.equal(first[key], other_seed[key]) for key in first)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny_vlm("not_a_family", tmp_path)


def test_sample_images():
    images = sample_images(30, size=48)
    assert len(images) == 30
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (48, 48) for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    again = sample_images(30, size=48)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]
    assert any(im.tobytes() == images[0].tobytes() for im in images[1:])  # cycles
