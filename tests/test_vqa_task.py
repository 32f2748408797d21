"""The synthetic VQA task behind the quality benchmark: deterministic, split-disjoint, answerable."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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
