"""Calibration data: every accepted row shape, answer-only labels, seeded selection, errors naming the row."""

from __future__ import annotations

import pytest
import torch
from _helpers import write_dataset_folder
from transformers import AutoProcessor

from tlq_hf.data import CAPTION_PROMPT, CalibrationDataError, build_calibration_set
from tlq_hf.testing.tiny_models import sample_images


@pytest.fixture(scope="module", params=["qwen2_vl", "gemma3"])
def processor(request, tiny_vlm_dirs):
    return AutoProcessor.from_pretrained(tiny_vlm_dirs[request.param])


def _answer_text(processor, sample):
    ids = sample.inputs["input_ids"][0][sample.labels[0] != -100]
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_question_answer_labels_cover_exactly_the_answer(processor):
    rows = [{"image": sample_images(1)[0], "question": "what is in the picture", "answer": "a red cat"}]
    (sample,) = build_calibration_set(rows, processor, 1)
    assert _answer_text(processor, sample) == "a red cat"
    assert sample.labels.shape == sample.inputs["input_ids"].shape
    assert "pixel_values" in sample.inputs


def test_messages_and_caption_rows(processor):
    img = sample_images(1)[0]
    rows = [
        {
            "image": img,
            "messages": [
                {"role": "user", "content": "what do you see"},
                {"role": "assistant", "content": "the white dog"},
            ],
        },
        {"image": [img, img], "text": "two blue car"},
    ]
    first, second = build_calibration_set(rows, processor, 2, seed=0)
    by_answer = {_answer_text(processor, s): s for s in (first, second)}
    assert set(by_answer) == {"the white dog", "two blue car"}
    prompt_ids = by_answer["two blue car"].inputs["input_ids"][0][by_answer["two blue car"].labels[0] == -100]
    assert CAPTION_PROMPT.lower().rstrip(".") in processor.tokenizer.decode(prompt_ids).lower()


def test_image_paths_and_seeded_selection(processor, tmp_path):
    paths = []
    for i, img in enumerate(sample_images(4)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    rows = [{"image": p, "question": "what is it", "answer": f"number {i}"} for i, p in enumerate(paths)]
    a = [_answer_text(processor, s) for s in build_calibration_set(rows, processor, 2, seed=1)]
    b = [_answer_text(processor, s) for s in build_calibration_set(rows, processor, 2, seed=1)]
    c = [_answer_text(processor, s) for s in build_calibration_set(rows, processor, 4, seed=2)]
    assert a == b and len(set(c)) == 4


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "answer": "a"}, "row 0: no 'image'"),
        ({"image": "/nonexistent.png", "question": "q", "answer": "a"}, "row 0: cannot read image"),
        ({"image": None, "text": "x"}, "row 0: no 'image'"),
        ({"image": "IMG", "question": "q"}, "row 0: needs 'messages'"),
        ({"image": "IMG", "question": "q", "answer": "  "}, "row 0: the answer is empty"),
        ({"image": "IMG", "messages": [{"role": "user", "content": "q"}]}, "row 0: 'messages' must end"),
    ],
)
def test_bad_rows_name_the_row(processor, row, message):
    if row.get("image") == "IMG":
        row["image"] = sample_images(1)[0]
    with pytest.raises(CalibrationDataError, match=message):
        build_calibration_set([row], processor, 1)


def test_max_length_truncates_the_answer_or_explains(processor):
    rows = [{"image": sample_images(1)[0], "question": "what", "answer": "a " * 50 + "cat"}]
    (full,) = build_calibration_set(rows, processor, 1)
    n_prompt = int((full.labels[0] == -100).sum())
    (cut,) = build_calibration_set(rows, processor, 1, max_length=n_prompt + 3)
    assert cut.num_tokens == n_prompt + 3 and int((cut.labels != -100).sum()) == 3
    with pytest.raises(CalibrationDataError, match="raise max_length"):
        build_calibration_set(rows, processor, 1, max_length=n_prompt - 1)


def test_local_dataset_folder(processor, tmp_path):
    pytest.importorskip("datasets")
    folder = write_dataset_folder(tmp_path / "calib", 3)
    samples = build_calibration_set(str(folder), processor, 3)
    assert len(samples) == 3 and all(int((s.labels != -100).sum()) > 0 for s in samples)


def test_template_bos_is_not_doubled_and_token_types_follow_truncation(processor):
    rows = [{"image": sample_images(1)[0], "question": "what", "answer": "a " * 20 + "cat"}]
    (full,) = build_calibration_set(rows, processor, 1)
    ids = full.inputs["input_ids"][0]
    bos = processor.tokenizer.bos_token_id
    if bos is not None:
        assert int((ids == bos).sum()) <= 1
    n_prompt = int((full.labels[0] == -100).sum())
    (cut,) = build_calibration_set(rows, processor, 1, max_length=n_prompt + 2)
    for key, value in cut.inputs.items():
        if key in ("input_ids", "attention_mask", "token_type_ids"):
            assert value.shape == (1, n_prompt + 2), key
    if "token_type_ids" in full.inputs:  # Gemma 3: 1 on the image tokens, which attend to each other
        image = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
        assert torch.equal(full.inputs["token_type_ids"][0].bool(), ids == image)


# --- hardening: every kind of image, bad bytes, folders that point outside, foreign processors -----------------


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_of(kind: str):
    import numpy as np
    from PIL import Image

    photo = sample_images(1, 64)[0]
    return {
        "greyscale": lambda: photo.convert("L"),
        "palette": lambda: photo.convert("P"),
        "rgba": lambda: photo.convert("RGBA"),
        "cmyk": lambda: photo.convert("CMYK"),
        "16-bit": lambda: Image.fromarray(np.full((40, 30), 32768, dtype=np.uint16)),
        "float": lambda: Image.fromarray(np.linspace(0, 5, 1200, dtype=np.float32).reshape(30, 40)),
        "huge": lambda: photo.resize((8000, 8000)),
        "wide": lambda: photo.resize((2000, 3)),
        "png-bytes": lambda: _png_bytes(photo),
        "datasets-dict": lambda: {"bytes": _png_bytes(photo), "path": None},
    }[kind]()


@pytest.mark.parametrize(
    "kind", ["greyscale", "palette", "rgba", "cmyk", "16-bit", "float", "huge", "png-bytes", "datasets-dict"]
)
def test_every_image_kind_is_encoded(processor, kind):
    (sample,) = build_calibration_set([{"image": _image_of(kind), "question": "q", "answer": "a cat"}], processor, 1)
    assert torch.isfinite(sample.inputs["pixel_values"].float()).all()
    assert _answer_text(processor, sample) == "a cat"


def test_an_extreme_aspect_ratio_is_encoded_or_refused_naming_the_row(processor):
    row = {"image": _image_of("wide"), "question": "q", "answer": "a cat"}
    try:
        (sample,) = build_calibration_set([row], processor, 1)  # Gemma 3 resizes it
    except CalibrationDataError as err:  # Qwen2-VL: "absolute aspect ratio must be smaller than 200"
        assert "calibration row 0: the processor cannot encode it (images 2000x3)" in str(err)
    else:
        assert torch.isfinite(sample.inputs["pixel_values"].float()).all()


def test_sixteen_bit_images_are_scaled_not_clipped():
    from tlq_hf.data import _to_rgb

    rgb = _to_rgb(_image_of("16-bit"), 0)
    assert rgb.mode == "RGB" and set(rgb.getpixel((0, 0))) == {128}  # 32768 / 65535 of full scale, not white


@pytest.mark.parametrize(
    "image, message",
    [
        (lambda: sample_images(1)[0].resize((1, 1)), "row 0: the image is 1x1 pixels"),
        (lambda: b"\x89PNG\r\n\x1a\nnot really a png", r"row 0: cannot read image <\d+ bytes>"),
        (lambda: _png_bytes(sample_images(1)[0])[:200], r"row 0: cannot read image <200 bytes>"),
        (lambda: {"bytes": None, "path": None}, "row 0: cannot read image None"),
    ],
    ids=["1x1", "corrupt-bytes", "truncated-png", "empty-datasets-dict"],
)
def test_unreadable_images_name_the_row(processor, image, message):
    with pytest.raises(CalibrationDataError, match=message):
        build_calibration_set([{"image": image(), "question": "q", "answer": "a"}], processor, 1)


def test_fewer_rows_than_requested_uses_them_all_and_says_so(processor, caplog):
    rows = [{"image": img, "question": "q", "answer": "a cat"} for img in sample_images(2)]
    with caplog.at_level("WARNING", logger="tlq_hf.data"):
        assert len(build_calibration_set(rows, processor, 5)) == 2
    assert "2 rows available, 5 requested" in caplog.text


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_dataset_folder_metadata_pointing_outside_is_refused(processor, tmp_path, file_name):
    import json

    folder = write_dataset_folder(tmp_path / "calib", 2)
    sample_images(1)[0].save(tmp_path / "outside.png")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": file_name, "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(CalibrationDataError, match=r"metadata.jsonl, line 3: file_name=.*points outside"):
        build_calibration_set(str(folder), processor, 3)


def test_processor_of_another_model_is_refused(tiny_vlm_dirs):
    """The model's image token must be in the encoded samples and every id inside its embedding. (The tiny
    fixtures share one word list, so their processors write overlapping ids; the foreign model is made by
    giving the config an image token id this processor never writes.)"""
    import copy

    from transformers import AutoConfig

    from tlq_hf.data import check_processor

    config = AutoConfig.from_pretrained(tiny_vlm_dirs["gemma3"])
    rows = [{"image": sample_images(1)[0], "question": "q", "answer": "a cat"}]
    own = AutoProcessor.from_pretrained(tiny_vlm_dirs["gemma3"])
    check_processor(config, own, build_calibration_set(rows, own, 1))  # its own: fine
    samples = build_calibration_set(rows, own, 1)
    written = set(samples[0].inputs["input_ids"][0].tolist())
    unused = next(i for i in range(100, 400) if i not in written)
    other = copy.deepcopy(config)  # a model whose image token this processor never writes
    other.image_token_id = unused
    message = rf"not the model's image token \(id {unused}\).*TLQConfig\(processor="
    with pytest.raises(CalibrationDataError, match=message):
        check_processor(other, own, samples)
    small = copy.deepcopy(config)
    small.get_text_config(decoder=True).vocab_size = 100
    with pytest.raises(CalibrationDataError, match=r"the model embeds 100 tokens"):
        check_processor(small, own, build_calibration_set(rows, own, 1))
    with pytest.raises(CalibrationDataError, match="no tokenizer and image processor"):
        check_processor(config, own.tokenizer)


def test_a_bad_row_fails_before_any_forward_pass_and_leaves_the_model(tiny_vlm_dirs):
    from _helpers import auto_class

    from tlq_hf import TLQConfig, quantize
    from tlq_hf.arch import find_decoder_stack
    from tlq_hf.testing.tiny_models import sample_rows

    model = auto_class().from_pretrained(tiny_vlm_dirs["llava"])
    calls = []
    find_decoder_stack(model).layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    rows = sample_rows(7) + [{"image": b"garbage", "question": "q", "answer": "a"}]
    with pytest.raises(CalibrationDataError, match="cannot read image"):
        quantize(
            model, TLQConfig(dataset=rows, num_samples=8, group_size=32, ignore=["re:.*vision_tower.*", "re:.*lm_head"])
        )
    assert calls == []  # refused before the first forward pass (and before the vision tower was rounded)
    assert getattr(model, "hf_quantizer", None) is None
