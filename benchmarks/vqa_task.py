"""A deterministic synthetic visual question answering task with single-word answers.

Each scene is a 3 x 3 grid of 32-pixel cells (a 96 x 96 RGB image); 3 to 7 cells hold a coloured shape
(5 colours x 4 shapes, with jittered size, position and tint), drawn over a plain light background or a
faded grey crop of a ``skimage.data`` photograph. Questions are chosen so that the language model carries
a real share of the answer, not only the vision tower:

* ``attribute`` (21 %): the colour or shape at a named cell ("what color is the shape in the top left?"),
  the row or column of a uniquely described object ("in which row is the red circle?");
* ``count`` (30 %): "how many red shapes are there?", "how many circles are there?", "how many shapes
  are there?";
* ``compare`` (27 %): "are there more red shapes than blue shapes?" (yes/no, balanced), "which color /
  shape is the most common?" (unique by construction);
* ``relation`` (22 %): two-step questions, the colour or shape of the object left of / right of / above /
  below a uniquely described object ("what color is the shape left of the square?").

Items are generated from string-seeded ``random.Random`` streams, one per
``(split, seed, index)``, so the train and test splits never share a stream and ``make_items(n)`` is a
prefix of ``make_items(m)`` for ``n <= m``. Rows are ``{"image", "question", "answer"}`` dicts (the row
format of :func:`tlq_hf.data.build_calibration_set`) plus ``type``, ``group`` and ``scene`` metadata.

:func:`text_prior_accuracy` measures the best question-only predictor, and :func:`evaluate` the greedy
first-answer-token accuracy of a model, batched through its processor's chat template.
"""

from __future__ import annotations

import functools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "CELL_NAMES",
    "COLORS",
    "GROUPS",
    "IMAGE_SIZE",
    "ItemStream",
    "QUESTION_TYPES",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "TextPrior",
    "accuracy_by",
    "cell_targets",
    "evaluate",
    "make_items",
    "neighbourhood_targets",
    "pick_relation",
    "render_scene",
    "text_prior_accuracy",
    "vocabulary",
]

# --------------------------------------------------------------------------- #
# Scene vocabulary and geometry
# --------------------------------------------------------------------------- #

#: Base RGB of each colour name; every drawn shape gets a small random tint around it.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 205, 30),
    "purple": (150, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

GRID = 3
CELL = 32
IMAGE_SIZE = GRID * CELL
#: Names of the grid cells in raster order (row-major, top left first).
CELL_NAMES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
_ROW_NAMES = ("top", "middle", "bottom")
_COLUMN_NAMES = ("left", "middle", "right")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MIN_OBJECTS, _MAX_OBJECTS = 3, 7
#: Relations as (phrase, row offset, column offset) from the reference object to the asked-about one.
RELATIONS = (("left of", 0, -1), ("right of", 0, 1), ("above", -1, 0), ("below", 1, 0))

#: Photographs bundled with scikit-image (no download), used as faded backgrounds.
_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
    "cell",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
)
_PHOTO_PROBABILITY = 0.5
#: Photos are cached with their shorter side at most this long (crops then stay cheap to resize).
_PHOTO_SIDE = 256
_SUPERSAMPLE = 2

#: A scene: for each cell in raster order, ``None`` or ``(colour, shape)``.
Scene = tuple[tuple[str, str] | None, ...]
SPLITS = ("train", "test")

# --------------------------------------------------------------------------- #
# Scenes and rendering
# --------------------------------------------------------------------------- #


def _sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(_MIN_OBJECTS, _MAX_OBJECTS)
    cells = set(rng.sample(range(GRID * GRID), n))
    colors, shapes = list(COLORS), list(SHAPES)
    return tuple((rng.choice(colors), rng.choice(shapes)) if i in cells else None for i in range(GRID * GRID))


@functools.cache
def _photo(name: str) -> Image.Image:
    from skimage import data

    array = np.asarray(getattr(data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array).convert("L")
    scale = _PHOTO_SIDE / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return image


def _background(rng: random.Random, side: int) -> Image.Image:
    """A plain light-grey tone or a random crop of a photo, greyed and faded so that colours stand out."""
    if rng.random() >= _PHOTO_PROBABILITY:
        base = rng.randint(190, 240)
        tone = tuple(min(255, base + rng.randint(-12, 12)) for _ in range(3))
        return Image.new("RGB", (side, side), tone)
    photo = _photo(rng.choice(_PHOTOS))
    crop = rng.randint(min(photo.size) // 2, min(photo.size))
    left, top = rng.randint(0, photo.width - crop), rng.randint(0, photo.height - crop)
    region = photo.crop((left, top, left + crop, top + crop)).resize((side, side), Image.Resampling.BILINEAR)
    grey = np.asarray(region, dtype=np.float32)
    faded = np.clip(rng.uniform(140, 175) + rng.uniform(0.3, 0.45) * (grey - 128.0), 0, 255).astype(np.uint8)
    return Image.fromarray(faded).convert("RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        w = 0.32 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image (jitter and background from ``rng``)."""
    s = _SUPERSAMPLE
    canvas = _background(rng, IMAGE_SIZE * s)
    draw = ImageDraw.Draw(canvas)
    for index, obj in enumerate(scene):
        if obj is None:
            continue
        color, shape = obj
        row, col = divmod(index, GRID)
        r = rng.uniform(9.0, 12.5)
        slack = CELL / 2 - r - 1.5
        cx = (col + 0.5) * CELL + rng.uniform(-slack, slack)
        cy = (row + 0.5) * CELL + rng.uniform(-slack, slack)
        fill = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in COLORS[color])
        _draw_shape(draw, shape, cx * s, cy * s, r * s, fill)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def cell_targets(scene: Scene) -> list[list[int]]:
    """Per-cell class indices for vision-tower pre-training, ``[10][cells]`` in raster order.

    Row 0 is each cell's colour and row 1 its shape (0 = empty, ``i + 1`` = ``list(COLORS)[i]`` /
    ``SHAPES[i]``); rows ``2 + 2k`` and ``3 + 2k`` are the colour and shape of the cell's neighbour in
    direction ``k`` of left, right, above, below (0 also when the neighbour is outside the grid).
    """
    colors, shapes = list(COLORS), list(SHAPES)
    return neighbourhood_targets(scene, lambda obj: (colors.index(obj[0]) + 1, shapes.index(obj[1]) + 1))


def neighbourhood_targets(scene: Scene, classes: Callable[[tuple[str, str]], tuple[int, int]]) -> list[list[int]]:
    """``[10][cells]`` rows: the two classes ``classes(obj)`` of each cell's object (0, 0 for an empty cell),
    then of its neighbour in each direction of :data:`RELATIONS` (0, 0 also outside the grid)."""

    def at(index: int | None) -> tuple[int, int]:
        obj = None if index is None else scene[index]
        return (0, 0) if obj is None else classes(obj)

    cells = range(GRID * GRID)
    rows = [[at(i)[k] for i in cells] for k in (0, 1)]
    for _, dr, dc in RELATIONS:
        rows += [[at(_neighbour(i, dr, dc))[k] for i in cells] for k in (0, 1)]
    return rows


def _neighbour(index: int, dr: int, dc: int) -> int | None:
    row, col = divmod(index, GRID)
    r, c = row + dr, col + dc
    return r * GRID + c if 0 <= r < GRID and 0 <= c < GRID else None


# --------------------------------------------------------------------------- #
# Questions
# --------------------------------------------------------------------------- #

#: A question generator: ``(scene, rng) -> (question, answer)``, or ``None`` if the scene does not fit.
_Generator = Callable[[Scene, random.Random], tuple[str, str] | None]


def _objects(scene: Scene) -> list[tuple[int, str, str]]:
    return [(i, obj[0], obj[1]) for i, obj in enumerate(scene) if obj is not None]


def _count(scene: Scene, color: str | None = None, shape: str | None = None) -> int:
    return sum(1 for _, c, s in _objects(scene) if (color is None or c == color) and (shape is None or s == shape))


def _unique_objects(scene: Scene) -> list[tuple[int, str]]:
    """``(cell, description)`` of every object a short phrase identifies: "the square" when it is the only
    square, else "the red square" when it is the only red square."""
    out = []
    for i, c, s in _objects(scene):
        if _count(scene, shape=s) == 1:
            out.append((i, s))
        elif _count(scene, c, s) == 1:
            out.append((i, f"{c} {s}"))
    return out


def _q_color_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    i, c, _ = rng.choice(_objects(scene))
    return f"what color is the shape in the {CELL_NAMES[i]}?", c


def _q_shape_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    i, _, s = rng.choice(_objects(scene))
    return f"what shape is in the {CELL_NAMES[i]}?", s


def _q_row(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    single = [(i, c, s) for i, c, s in _objects(scene) if _count(scene, c, s) == 1]
    if not single:
        return None
    i, c, s = rng.choice(single)
    return f"in which row is the {c} {s}?", _ROW_NAMES[i // GRID]


def _q_column(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    single = [(i, c, s) for i, c, s in _objects(scene) if _count(scene, c, s) == 1]
    if not single:
        return None
    i, c, s = rng.choice(single)
    return f"in which column is the {c} {s}?", _COLUMN_NAMES[i % GRID]


def _target(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A ``(colour, shape)`` to count: two times in three taken from a drawn object, else uniform, so
    that count answers are not dominated by "zero"."""
    if rng.random() < 2 / 3:
        _, c, s = rng.choice(_objects(scene))
        return c, s
    return rng.choice(list(COLORS)), rng.choice(SHAPES)


def _q_count_color(scene: Scene, rng: random.Random) -> tuple[str, str]:
    c, _ = _target(scene, rng)
    return f"how many {c} shapes are there?", _NUMBERS[_count(scene, color=c)]


def _q_count_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    _, s = _target(scene, rng)
    return f"how many {_PLURALS[s]} are there?", _NUMBERS[_count(scene, shape=s)]


def _q_count_all(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "how many shapes are there?", _NUMBERS[_count(scene)]


def _q_more_color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    c1, c2 = rng.sample(list(COLORS), 2)
    n1, n2 = _count(scene, color=c1), _count(scene, color=c2)
    if n1 + n2 == 0:
        return None
    return f"are there more {c1} shapes than {c2} shapes?", "yes" if n1 > n2 else "no"


def _most_common(values: Iterable[str]) -> str | None:
    ranked = Counter(values).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def _q_most_color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    best = _most_common(c for _, c, _ in _objects(scene))
    return None if best is None else ("which color is the most common?", best)


def _q_most_shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    best = _most_common(s for _, _, s in _objects(scene))
    return None if best is None else ("which shape is the most common?", best)


def pick_relation(
    scene: Scene, references: list[tuple[int, str]], rng: random.Random
) -> tuple[str, str, tuple[str, str]] | None:
    """A random ``(relation phrase, reference description, the related cell's object)`` over the uniquely
    described ``references`` (``(cell, description)``) that have an object next to them, or ``None``."""
    options = []
    for i, description in references:
        for phrase, dr, dc in RELATIONS:
            j = _neighbour(i, dr, dc)
            if j is not None and scene[j] is not None:
                options.append((phrase, description, scene[j]))
    return rng.choice(options) if options else None


def _relation(scene: Scene, rng: random.Random) -> tuple[str, str, tuple[str, str]] | None:
    """A random ``(relation phrase, reference description, (colour, shape) of the related object)``."""
    return pick_relation(scene, _unique_objects(scene), rng)


def _q_relation_color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    found = _relation(scene, rng)
    if found is None:
        return None
    phrase, reference, (c, _) = found
    return f"what color is the shape {phrase} the {reference}?", c


def _q_relation_shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    found = _relation(scene, rng)
    if found is None:
        return None
    phrase, reference, (_, s) = found
    return f"what shape is {phrase} the {reference}?", s


#: Question type -> (group, sampling weight, generator). Weights sum to 100 (percent of items).
_TYPES: dict[str, tuple[str, int, _Generator]] = {
    "color_at": ("attribute", 9, _q_color_at),
    "shape_at": ("attribute", 8, _q_shape_at),
    "row": ("attribute", 2, _q_row),
    "column": ("attribute", 2, _q_column),
    "count_color": ("count", 12, _q_count_color),
    "count_shape": ("count", 10, _q_count_shape),
    "count_all": ("count", 8, _q_count_all),
    "more_color": ("compare", 12, _q_more_color),
    "most_color": ("compare", 8, _q_most_color),
    "most_shape": ("compare", 7, _q_most_shape),
    "relation_color": ("relation", 11, _q_relation_color),
    "relation_shape": ("relation", 11, _q_relation_shape),
}
QUESTION_TYPES: tuple[str, ...] = tuple(_TYPES)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(group for group, _, _ in _TYPES.values()))
_YES_NO_TYPES = frozenset({"more_color"})
_MAX_TRIES = 1000


@dataclass(frozen=True)
class ItemStream:
    """How one task turns ``(split, seed, index)`` into an item: its own string-seeded random stream (named
    ``name``), question types with sampling weights, the yes/no types (balanced), a scene sampler and a
    renderer."""

    name: str
    types: dict[str, tuple[str, int, _Generator]]
    yes_no: frozenset[str]
    sample_scene: Callable[[random.Random], Scene]
    render: Callable[[Scene, random.Random], Image.Image]

    def item(self, split: str, seed: int, index: int) -> dict[str, Any]:
        """Item ``index`` of the ``(split, seed)`` stream."""
        rng = random.Random(f"{self.name}/{split}/{seed}/{index}")
        qtype = rng.choices(list(self.types), weights=[w for _, w, _ in self.types.values()])[0]
        group, _, generate = self.types[qtype]
        wanted = rng.choice(("yes", "no")) if qtype in self.yes_no else None
        for _ in range(_MAX_TRIES):
            scene = self.sample_scene(rng)
            qa = generate(scene, rng)
            if qa is not None and (wanted is None or qa[1] == wanted):
                break
        else:  # pragma: no cover - every type fits a large share of scenes
            raise RuntimeError(f"no scene fits question type {qtype!r} after {_MAX_TRIES} tries")
        question, answer = qa
        return {
            "image": self.render(scene, rng),
            "question": question,
            "answer": answer,
            "type": qtype,
            "group": group,
            "scene": scene,
        }

    def items(self, n: int, seed: int, split: str, start: int) -> list[dict[str, Any]]:
        """Items ``start .. start + n - 1`` of the ``(split, seed)`` stream."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0 or start < 0:
            raise ValueError(f"need n >= 0 and start >= 0, got n={n}, start={start}")
        return [self.item(split, seed, i) for i in range(start, start + n)]


_STREAM = ItemStream("tlq-vqa", _TYPES, _YES_NO_TYPES, _sample_scene, render_scene)


def make_items(n: int, seed: int = 0, split: str = "train", start: int = 0) -> list[dict[str, Any]]:
    """Items ``start .. start + n - 1`` of the ``(split, seed)`` stream.

    Each item is ``{"image": PIL.Image (96 x 96 RGB), "question": str, "answer": str (one word),
    "type": question type, "group": question group, "scene": the cells}``; item ``i`` depends only on
    ``(split, seed, i)``, so splits never share a random stream.
    """
    return _STREAM.items(n, seed, split, start)


def vocabulary() -> tuple[str, ...]:
    """Every word that questions and answers of this task use (lowercase, punctuation excluded)."""
    words = {
        *"what color is the shape in which row column how many are there more than shapes most common".split(),
        *"left right of above below top middle bottom center yes no".split(),
        *COLORS,
        *SHAPES,
        *_PLURALS.values(),
        *_NUMBERS,
    }
    for name in CELL_NAMES:
        words.update(name.split())
    return tuple(sorted(words))


# --------------------------------------------------------------------------- #
# Text-only prior and evaluation
# --------------------------------------------------------------------------- #


class TextPrior:
    """The best question-only predictor: the majority training answer of the exact question text when it
    was seen at least ``min_count`` times, else the majority answer of its question type, else the overall
    majority answer."""

    def __init__(self, train_items: Sequence[dict[str, Any]], min_count: int = 20) -> None:
        if not train_items:
            raise ValueError("TextPrior needs at least one training item")
        by_question: dict[str, Counter] = defaultdict(Counter)
        by_type: dict[str, Counter] = defaultdict(Counter)
        for item in train_items:
            by_question[item["question"]][item["answer"]] += 1
            by_type[item.get("type", "")][item["answer"]] += 1
        self.by_question = {
            q: counts.most_common(1)[0][0] for q, counts in by_question.items() if counts.total() >= min_count
        }
        self.by_type = {t: counts.most_common(1)[0][0] for t, counts in by_type.items()}
        self.overall = Counter(item["answer"] for item in train_items).most_common(1)[0][0]

    def predict(self, item: dict[str, Any]) -> str:
        """The predicted answer for ``item`` from its question (and type) alone."""
        if item["question"] in self.by_question:
            return self.by_question[item["question"]]
        return self.by_type.get(item.get("type", ""), self.overall)


def text_prior_accuracy(train_items: Sequence[dict[str, Any]], eval_items: Sequence[dict[str, Any]]) -> float:
    """Accuracy on ``eval_items`` of the :class:`TextPrior` learned on ``train_items``."""
    prior = TextPrior(train_items)
    return float(np.mean([prior.predict(item) == item["answer"] for item in eval_items]))


def accuracy_by(items: Sequence[dict[str, Any]], correct: Sequence[bool], key: str) -> dict[str, float]:
    """Accuracy per value of ``item[key]`` (e.g. ``"type"`` or ``"group"``), in first-seen order."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct, strict=True):
        hits[item[key]].append(bool(ok))
    return {name: float(np.mean(values)) for name, values in hits.items()}


def _prompt(processor: Any, question: str) -> str:
    """The generation prompt exactly as :func:`tlq_hf.data.build_calibration_set` renders it."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _answer_token(tokenizer: Any, answer: str) -> int:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} encodes to no token")
    return int(ids[0])


@torch.inference_mode()
def evaluate(model: Any, processor: Any, items: Sequence[dict[str, Any]], batch_size: int = 64) -> dict[str, Any]:
    """Greedy first-answer-token accuracy of ``model`` on ``items``.

    Prompts go through the processor's chat template (as in :func:`tlq_hf.data.build_calibration_set`),
    batched with the tokenizer's padding side; the argmax of the next-token logits at the last prompt
    position is compared with the first token of the answer word.

    Returns ``{"accuracy", "predictions" (decoded predicted tokens), "correct" (per item),
    "by_type", "by_group"}``.
    """
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    correct: list[bool] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            inputs = processor(
                text=[_prompt(processor, item["question"]) for item in batch],
                images=[[item["image"].convert("RGB")] for item in batch],  # one image per prompt
                return_tensors="pt",
                padding=True,
            )
            inputs = inputs.to(model.device)
            mask = inputs["attention_mask"]
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
            logits = model(**inputs).logits
            predicted = logits[torch.arange(len(batch), device=logits.device), last].argmax(-1).tolist()
            predictions += tokenizer.convert_ids_to_tokens(predicted)
            correct += [p == _answer_token(tokenizer, item["answer"]) for p, item in zip(predicted, batch)]
    finally:
        model.train(was_training)
    return {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "predictions": predictions,
        "correct": correct,
        "by_type": accuracy_by(items, correct, "type") if items and "type" in items[0] else {},
        "by_group": accuracy_by(items, correct, "group") if items and "group" in items[0] else {},
    }
