"""The synthetic VQA tasks behind the quality benchmark: deterministic, split-disjoint, answerable."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reading_task  # noqa: E402
import vqa_task  # noqa: E402


def test_items_are_deterministic_prefixes_and_splits_differ():
    a = vqa_task.make_items(12, seed=3, split="train")
    b = vqa_task.make_items(20, seed=3, split="train")
    assert [(i["question"], i["answer"]) for i in a] == [(i["question"], i["answer"]) for i in b[:12]]
    assert np.array_equal(np.asarray(a[5]["image"]), np.asarray(b[5]["image"]))
    tail = vqa_task.make_items(4, seed=3, split="train", start=8)
    assert [i["question"] for i in tail] == [i["question"] for i in a[8:12]]
    test = vqa_task.make_items(12, seed=3, split="test")
    assert any(not np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, test))
    with pytest.raises(ValueError, match="split"):
        vqa_task.make_items(1, split="dev")


def test_answers_are_single_vocabulary_words_consistent_with_the_scene():
    words = set(vqa_task.vocabulary())
    for item in vqa_task.make_items(200, seed=11, split="test"):
        assert item["image"].size == (vqa_task.IMAGE_SIZE, vqa_task.IMAGE_SIZE)
        assert item["answer"] in words and " " not in item["answer"]
        assert set(item["question"].rstrip("?").split()) <= words
        objects = [obj for obj in item["scene"] if obj is not None]
        if item["question"] == "how many shapes are there?":
            assert item["answer"] == ("zero one two three four five six seven eight nine".split())[len(objects)]


def test_cell_targets_describe_the_cell_and_its_neighbours():
    item = vqa_task.make_items(1, seed=0, split="test")[0]
    rows = vqa_task.cell_targets(item["scene"])
    assert len(rows) == 2 * (1 + len(vqa_task.RELATIONS)) and all(len(r) == vqa_task.GRID**2 for r in rows)
    for index, obj in enumerate(item["scene"]):
        assert (rows[0][index] == 0) == (obj is None)
        # the right-hand neighbour of cell i is cell i + 1 inside a row, nothing at the right edge
        right = rows[4][index]
        if index % vqa_task.GRID == vqa_task.GRID - 1:
            assert right == 0
        else:
            assert right == rows[0][index + 1]


def test_text_prior_only_sees_questions():
    train = vqa_task.make_items(300, seed=1, split="train")
    test = vqa_task.make_items(100, seed=1, split="test")
    accuracy = vqa_task.text_prior_accuracy(train, test)
    assert 0.05 < accuracy < 0.7  # above chance over ~20 answers, far below a model that sees the image


# --------------------------------------------------------------------------- #
# The reading task (the second task mix): same interface, its own streams
# --------------------------------------------------------------------------- #

_NUMBERS = "zero one two three four five six seven eight nine".split()


def test_reading_items_are_deterministic_and_never_coincide_with_the_shapes_task():
    a = reading_task.make_items(10, seed=2, split="train")
    b = reading_task.make_items(4, seed=2, split="train", start=6)
    assert [i["question"] for i in a[6:]] == [i["question"] for i in b]
    assert np.array_equal(np.asarray(a[7]["image"]), np.asarray(b[1]["image"]))
    shapes = vqa_task.make_items(10, seed=2, split="train")
    assert all(not np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, shapes))
    with pytest.raises(ValueError, match="split"):
        reading_task.make_items(1, split="dev")


def test_reading_answers_follow_from_the_scene():
    words = set(reading_task.vocabulary())
    seen = set()
    for item in reading_task.make_items(300, seed=5, split="test"):
        seen.add(item["type"])
        assert item["answer"] in words and set(item["question"].replace(",", "").rstrip("?").split()) <= words
        objects = [obj for obj in item["scene"] if obj is not None]
        digits = [_NUMBERS.index(w) for _, w in objects if w in _NUMBERS]
        if item["type"] == "largest":
            assert item["answer"] == _NUMBERS[max(digits)]
        elif item["type"] == "smallest":
            assert item["answer"] == _NUMBERS[min(digits)]
        elif item["type"] == "count_letters":
            assert item["answer"] == _NUMBERS[len(objects) - len(digits)]
        elif item["type"] == "exists":
            asked = item["question"].split()[-1].rstrip("?")
            assert item["answer"] == ("yes" if any(w == asked for _, w in objects) else "no")
        elif item["type"] == "read_at":
            cell = reading_task.CELL_NAMES.index(item["question"].removeprefix("what is written in the ").rstrip("?"))
            assert item["scene"][cell][1] == item["answer"]
    assert seen == set(reading_task.QUESTION_TYPES)


def test_reading_cell_targets_use_the_character_classes():
    item = reading_task.make_items(1, seed=0, split="test")[0]
    rows = reading_task.cell_targets(item["scene"])
    colors, glyphs = reading_task.CLASS_COUNTS
    assert max(rows[0]) < colors and max(rows[1]) < glyphs and len(rows) == 2 * (1 + len(reading_task.RELATIONS))
    for index, obj in enumerate(item["scene"]):
        assert (rows[1][index] == 0) == (obj is None)
    train = reading_task.make_items(300, seed=1, split="train")
    assert 0.05 < reading_task.text_prior_accuracy(train, reading_task.make_items(100, seed=1, split="test")) < 0.6
