"""A second synthetic visual QA task with single-word answers: reading characters in a grid.

The scenes of :mod:`vqa_task` (a 3 x 3 grid of 32-pixel cells over a plain or faded-photo background) hold
3 to 6 coloured characters instead of shapes: digits 0-9 and eight letters, drawn with Pillow's bundled
scalable font at a jittered size and position. The question mix leans on reading and on reasoning over
what was read, not on the shape and colour attributes :mod:`vqa_task` asks about:

* ``read`` (22 %): the character at a named cell ("what is written in the top left?"), the colour of a
  unique character ("what color is the seven?");
* ``count`` (26 %): "how many digits are there?", "how many letters are there?", "how many red
  characters are there?";
* ``compare`` (32 %): "what is the largest digit?", "what is the smallest digit?", "which is larger, the
  digit in the top left or the digit in the center?", "is there a five?" (yes/no, balanced);
* ``relation`` (20 %): "what is written left of the seven?", "what color is the character above the k?".

Digits are answered as number words ("seven") and letters as the lowercase letter ("k"), so every answer
is one word of :func:`vocabulary`. The module has the interface of :mod:`vqa_task` that the training and
quality scripts use (``make_items``, ``cell_targets``, ``evaluate``, ``TextPrior``, ``vocabulary``,
``QUESTION_TYPES``, ``GROUPS``, ``CLASS_COUNTS``); items come from string-seeded streams of their own, so
they never coincide with :mod:`vqa_task`'s.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from vqa_task import (  # noqa: F401 - re-exported: the shared evaluation interface
    CELL,
    CELL_NAMES,
    COLORS,
    GRID,
    IMAGE_SIZE,
    RELATIONS,
    SPLITS,
    ItemStream,
    TextPrior,
    _background,
    accuracy_by,
    evaluate,
    neighbourhood_targets,
    pick_relation,
    text_prior_accuracy,
)

__all__ = [
    "CELL",
    "CLASS_COUNTS",
    "GLYPHS",
    "GRID",
    "GROUPS",
    "IMAGE_SIZE",
    "QUESTION_TYPES",
    "RELATIONS",
    "TextPrior",
    "accuracy_by",
    "cell_targets",
    "evaluate",
    "make_items",
    "render_scene",
    "text_prior_accuracy",
    "vocabulary",
]

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_LETTERS = ("k", "m", "p", "r", "t", "w", "x", "z")
#: Every character a scene can hold, as ``(drawn text, answer word)``: digits first, then letters.
GLYPHS: tuple[tuple[str, str], ...] = tuple(zip("0123456789", _NUMBERS, strict=True)) + tuple(
    (letter.upper(), letter) for letter in _LETTERS
)
_WORDS = tuple(word for _, word in GLYPHS)
#: Classes per cell for vision pre-training: (colours + empty, characters + empty).
CLASS_COUNTS = (len(COLORS) + 1, len(GLYPHS) + 1)
_MIN_OBJECTS, _MAX_OBJECTS = 3, 6
_SUPERSAMPLE = 2
_STROKE = 1  # bold strokes (pixels of outline at the final size): thin strokes leave too few coloured pixels
_JITTER = 3.0  # pixels a character may move from its cell's centre, each axis

#: A scene: for each cell in raster order, ``None`` or ``(colour, character word)``.
Scene = tuple[tuple[str, str] | None, ...]


def _is_digit(word: str) -> bool:
    return word in _NUMBERS


def _sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(_MIN_OBJECTS, _MAX_OBJECTS)
    cells = set(rng.sample(range(GRID * GRID), n))
    colors = list(COLORS)
    return tuple((rng.choice(colors), rng.choice(_WORDS)) if i in cells else None for i in range(GRID * GRID))


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image (jitter and background from ``rng``)."""
    s = _SUPERSAMPLE
    canvas = _background(rng, IMAGE_SIZE * s)
    draw = ImageDraw.Draw(canvas)
    text = dict(GLYPHS)
    drawn = {word: glyph for glyph, word in text.items()}
    for index, obj in enumerate(scene):
        if obj is None:
            continue
        color, word = obj
        row, col = divmod(index, GRID)
        font = _font(rng.randint(24, 27) * s)
        left, top, right, bottom = draw.textbbox((0, 0), drawn[word], font=font, stroke_width=_STROKE * s)
        width, height = right - left, bottom - top
        # a little jitter only: one 32-px patch per cell must still read the character
        slack_x = min(_JITTER * s, max(0.0, CELL * s / 2 - width / 2 - 2 * s))
        slack_y = min(_JITTER * s, max(0.0, CELL * s / 2 - height / 2 - 2 * s))
        cx = (col + 0.5) * CELL * s + rng.uniform(-slack_x, slack_x)
        cy = (row + 0.5) * CELL * s + rng.uniform(-slack_y, slack_y)
        fill = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in COLORS[color])
        draw.text(
            (cx - width / 2 - left, cy - height / 2 - top),
            drawn[word],
            font=font,
            fill=fill,
            stroke_width=_STROKE * s,
            stroke_fill=fill,
        )
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def cell_targets(scene: Scene) -> list[list[int]]:
    """Per-cell class indices for vision-tower pre-training, ``[10][cells]`` in raster order.

    Row 0 is each cell's colour and row 1 its character (0 = empty, ``i + 1`` = ``list(COLORS)[i]`` /
    ``GLYPHS[i]``); rows ``2 + 2k`` and ``3 + 2k`` are those of the cell's neighbour in direction ``k`` of
    left, right, above, below (0 also when the neighbour is outside the grid).
    """
    colors = list(COLORS)
    return neighbourhood_targets(scene, lambda obj: (colors.index(obj[0]) + 1, _WORDS.index(obj[1]) + 1))


# --------------------------------------------------------------------------- #
# Questions
# --------------------------------------------------------------------------- #

_Generator = Callable[[Scene, random.Random], tuple[str, str] | None]


def _objects(scene: Scene) -> list[tuple[int, str, str]]:
    return [(i, obj[0], obj[1]) for i, obj in enumerate(scene) if obj is not None]


def _noun(word: str) -> str:
    return f"the {word}" if _is_digit(word) else f"the letter {word}"


def _unique(scene: Scene) -> list[tuple[int, str]]:
    """``(cell, description)`` of every character a short phrase identifies: "the seven" when it is the
    only seven, else "the red seven" when it is the only red seven."""
    words = Counter(w for _, _, w in _objects(scene))
    pairs = Counter((c, w) for _, c, w in _objects(scene))
    out = []
    for i, c, w in _objects(scene):
        if words[w] == 1:
            out.append((i, _noun(w)))
        elif pairs[(c, w)] == 1:
            out.append((i, _noun(w).replace("the ", f"the {c} ", 1)))
    return out


def _digits(scene: Scene) -> list[tuple[int, int]]:
    """``(cell, value)`` of every digit in the scene."""
    return [(i, _NUMBERS.index(w)) for i, _, w in _objects(scene) if _is_digit(w)]


def _q_read_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    i, _, w = rng.choice(_objects(scene))
    return f"what is written in the {CELL_NAMES[i]}?", w


def _q_color_of(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    options = _unique(scene)
    if not options:
        return None
    i, description = rng.choice(options)
    return f"what color is {description}?", scene[i][0]  # type: ignore[index]


def _q_count_digits(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "how many digits are there?", _NUMBERS[len(_digits(scene))]


def _q_count_letters(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "how many letters are there?", _NUMBERS[len(_objects(scene)) - len(_digits(scene))]


def _q_count_color(scene: Scene, rng: random.Random) -> tuple[str, str]:
    color = rng.choice(_objects(scene))[1] if rng.random() < 2 / 3 else rng.choice(list(COLORS))
    return f"how many {color} characters are there?", _NUMBERS[sum(c == color for _, c, _ in _objects(scene))]


def _q_largest(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    digits = _digits(scene)
    return ("what is the largest digit?", _NUMBERS[max(v for _, v in digits)]) if len(digits) >= 2 else None


def _q_smallest(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    digits = _digits(scene)
    return ("what is the smallest digit?", _NUMBERS[min(v for _, v in digits)]) if len(digits) >= 2 else None


def _q_larger_of(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    digits = _digits(scene)
    if len(digits) < 2:
        return None
    (i, a), (j, b) = rng.sample(digits, 2)
    if a == b:
        return None
    question = f"which is larger, the digit in the {CELL_NAMES[i]} or the digit in the {CELL_NAMES[j]}?"
    return question, _NUMBERS[max(a, b)]


def _q_exists(scene: Scene, rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_NUMBERS)
    return f"is there a {word}?", "yes" if any(w == word for _, _, w in _objects(scene)) else "no"


def _relation_question(template: str, field: int) -> _Generator:
    """A two-step question: ``template`` (with ``{phrase}`` and ``{reference}``) about the character next to
    a uniquely described one; the answer is field ``field`` of that character (0 colour, 1 the character)."""

    def generate(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
        found = pick_relation(scene, _unique(scene), rng)
        if found is None:
            return None
        phrase, reference, obj = found
        return template.format(phrase=phrase, reference=reference), obj[field]

    return generate


_q_relation_read = _relation_question("what is written {phrase} {reference}?", 1)
_q_relation_color = _relation_question("what color is the character {phrase} {reference}?", 0)


#: Question type -> (group, sampling weight, generator). Weights sum to 100 (percent of items).
_TYPES: dict[str, tuple[str, int, _Generator]] = {
    "read_at": ("read", 14, _q_read_at),
    "color_of": ("read", 8, _q_color_of),
    "count_digits": ("count", 10, _q_count_digits),
    "count_letters": ("count", 8, _q_count_letters),
    "count_color": ("count", 8, _q_count_color),
    "largest": ("compare", 10, _q_largest),
    "smallest": ("compare", 6, _q_smallest),
    "larger_of": ("compare", 8, _q_larger_of),
    "exists": ("compare", 8, _q_exists),
    "relation_read": ("relation", 12, _q_relation_read),
    "relation_color": ("relation", 8, _q_relation_color),
}
QUESTION_TYPES: tuple[str, ...] = tuple(_TYPES)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(group for group, _, _ in _TYPES.values()))
_STREAM = ItemStream("tlq-read", _TYPES, frozenset({"exists"}), _sample_scene, render_scene)


def make_items(n: int, seed: int = 0, split: str = "train", start: int = 0) -> list[dict[str, Any]]:
    """Items ``start .. start + n - 1`` of the ``(split, seed)`` stream (see :func:`vqa_task.make_items`)."""
    return _STREAM.items(n, seed, split, start)


def vocabulary() -> tuple[str, ...]:
    """Every word that questions and answers of this task use (lowercase, punctuation excluded)."""
    words = {
        *"what is written in the color how many digits letters characters are there largest smallest".split(),
        *"digit which larger or letter character of yes no a left right above below top bottom center".split(),
        *COLORS,
        *_WORDS,
    }
    for name in CELL_NAMES:
        words.update(name.split())
    return tuple(sorted(words))
