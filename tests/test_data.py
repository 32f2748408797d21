"""Calibration data: every accepted row shape, answer-only labels, seeded selection, errors naming the row."""

from __future__ import annotations

import pytest
import torch
from _helpers import write_dataset_folder
from transformers import AutoProcessor

from tlq_hf.data import CAPTION_PROMPT, CalibrationDataError, build_calibration_set
from tlq_hf.tiny_models import sample_images


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
