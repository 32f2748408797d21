"""Calibration data: rows (image + question/answer) -> processor -> per-sample tensors with answer labels.

Accepted rows (dicts, from a list, a ``datasets.Dataset``, a local dataset folder or a Hub dataset id):

* ``image``/``images``: a PIL image, a path, or a list of them;
* and one of: ``messages`` (chat format; the last assistant message is the answer), ``question`` +
  ``answer``, or ``text`` (a caption, used as the answer to :data:`CAPTION_PROMPT`).

Prompt and answer go through the processor's own chat template; ``labels`` are ``-100`` everywhere but
on the answer tokens (the tokens after the longest common prefix of the rendered prompt and the rendered
conversation, which tolerates templates whose generation prompt differs by whitespace).
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = [
    "CAPTION_PROMPT",
    "CalibrationSample",
    "CalibrationDataError",
    "load_rows",
    "build_calibration_set",
    "check_processor",
    "rendered_text_kwargs",
]

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "Describe the image."


class CalibrationDataError(ValueError):
    """A calibration row that cannot be used, with the row's index in the message."""


@dataclass
class CalibrationSample:
    """One processed calibration sample (batch size 1)."""

    inputs: dict[str, torch.Tensor]  # processor outputs: input_ids, attention_mask, pixel_values, ...
    labels: torch.Tensor  # [1, T]; -100 outside the answer

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


def load_rows(dataset: Any) -> Sequence[dict]:
    """Rows from a list of dicts, a ``datasets.Dataset``, a local dataset folder or a Hub dataset id."""
    if isinstance(dataset, str | os.PathLike):
        try:
            import datasets
        except ImportError as err:
            raise ImportError("A dataset given by name or folder needs `pip install datasets`.") from err
        if os.path.isdir(dataset):
            _check_confined(Path(dataset))
        loaded = datasets.load_dataset(os.fspath(dataset))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    if isinstance(dataset, Sequence) or hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return dataset
    raise TypeError(
        f"TLQConfig(dataset=...) got {type(dataset).__name__}; pass a list of dicts, a datasets.Dataset, "
        "a local dataset folder or a Hub dataset id."
    )


def _check_confined(folder: Path) -> None:
    """Refuse a dataset folder whose metadata points at files outside it (``../``, absolute paths, links)."""
    import csv
    import json

    root = folder.resolve()
    for meta in sorted(folder.rglob("metadata.*")):
        if meta.suffix == ".jsonl":
            with open(meta) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif meta.suffix == ".csv":
            with open(meta, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            continue
        for k, row in enumerate(rows):
            for key, value in row.items():
                if not (key == "file_name" or key.endswith("_file_name")) or not isinstance(value, str):
                    continue
                target = (meta.parent / value).resolve()
                if not target.is_relative_to(root):
                    raise CalibrationDataError(
                        f"{meta}, line {k + 1}: {key}={value!r} points outside the dataset folder {root}; "
                        "dataset files must live inside the folder (copy the image there)."
                    )


def _images(row: dict, index: int) -> list[Image.Image]:
    value = row.get("images", row.get("image"))
    if value is None:
        raise CalibrationDataError(f"calibration row {index}: no 'image' (or 'images') field.")
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(_to_rgb(item, index))
            continue
        if isinstance(item, dict):  # datasets' undecoded Image feature: {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
        shown = f"<{len(item)} bytes>" if isinstance(item, bytes | bytearray) else repr(item)
        if isinstance(item, bytes | bytearray):
            item = io.BytesIO(item)
        try:
            with Image.open(item) as img:
                out.append(_to_rgb(img, index))
        except (OSError, TypeError, AttributeError, ValueError, Image.DecompressionBombError) as err:
            raise CalibrationDataError(f"calibration row {index}: cannot read image {shown} ({err}).") from err
    if not out:
        raise CalibrationDataError(f"calibration row {index}: the image list is empty.")
    return out


#: Integer modes whose full range is not 0..255: scaled down by their range, not clipped (a 16-bit scan would
#: otherwise turn white).
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def _to_rgb(img: Image.Image, index: int) -> Image.Image:
    """Any PIL mode (greyscale, palette, RGBA, CMYK, 16-bit, float) as 8-bit RGB; tiny images are refused."""
    if min(img.size) < 2:
        raise CalibrationDataError(
            f"calibration row {index}: the image is {img.size[0]}x{img.size[1]} pixels; use images of at least a "
            "few pixels per side (the processor resizes them to its own size)."
        )
    if img.mode in _WIDE_MODES or img.mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, float(_WIDE_MODES[img.mode])) if img.mode in _WIDE_MODES else (arr.min(), arr.max())
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12), 0, 1) * 255
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _conversation(row: dict, index: int, n_images: int) -> tuple[list[dict], str]:
    """``(prompt messages, answer text)`` with one image entry per image."""
    image_entries = [{"type": "image"} for _ in range(n_images)]
    if "messages" in row and row["messages"]:
        messages = [dict(m) for m in row["messages"]]
        if messages[-1].get("role") != "assistant":
            raise CalibrationDataError(f"calibration row {index}: 'messages' must end with an assistant answer.")
        answer = _text_of(messages[-1]["content"])
        prompt = messages[:-1]
        has_image_entry = any(
            isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"]) for m in prompt
        )
        if not has_image_entry:
            first_user = next((m for m in prompt if m.get("role") == "user"), None)
            if first_user is None:
                raise CalibrationDataError(f"calibration row {index}: 'messages' has no user turn.")
            first_user["content"] = image_entries + [{"type": "text", "text": _text_of(first_user["content"])}]
    elif "question" in row and "answer" in row:
        prompt = [{"role": "user", "content": image_entries + [{"type": "text", "text": str(row["question"])}]}]
        answer = row["answer"]
    elif "text" in row:
        prompt = [{"role": "user", "content": image_entries + [{"type": "text", "text": CAPTION_PROMPT}]}]
        answer = row["text"]
    else:
        raise CalibrationDataError(
            f"calibration row {index}: needs 'messages', 'question' + 'answer', or 'text'; has {sorted(row)}."
        )
    answer = "" if answer is None else str(answer)
    if not answer.strip():
        raise CalibrationDataError(f"calibration row {index}: the answer is empty.")
    return prompt, answer


def rendered_text_kwargs(processor: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Tokenizer kwargs for texts a chat template rendered: ``add_special_tokens=False`` when the template already
    wrote the BOS token (Gemma's does), so that the tokenizer does not add a second one; else none.

    The same rule transformers applies in ``apply_chat_template(..., tokenize=True)``.
    """
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    if bos and texts and all(text.startswith(bos) for text in texts):
        return {"add_special_tokens": False}
    return {}


def _encode(processor: Any, row: dict, index: int, max_length: int | None) -> CalibrationSample:
    images = _images(row, index)
    prompt, answer = _conversation(row, index, len(images))
    full = prompt + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    prompt_text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(full, tokenize=False)
    text_kwargs = rendered_text_kwargs(processor, [full_text, prompt_text])
    try:
        enc = processor(text=[full_text], images=images, return_tensors="pt", **text_kwargs)
        prompt_ids = processor(text=[prompt_text], images=images, return_tensors="pt", **text_kwargs)["input_ids"][0]
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        sizes = ", ".join(f"{im.size[0]}x{im.size[1]}" for im in images)
        raise CalibrationDataError(
            f"calibration row {index}: the processor cannot encode it (images {sizes}): {err}"
        ) from err
    ids = enc["input_ids"][0]
    n = min(len(prompt_ids), len(ids))
    mismatch = (prompt_ids[:n] != ids[:n]).nonzero()
    n_prompt = int(mismatch[0]) if len(mismatch) else n
    if max_length is not None and len(ids) > max_length:
        if n_prompt >= max_length:
            raise CalibrationDataError(
                f"calibration row {index}: the prompt with its image tokens is {n_prompt} tokens, over "
                f"max_length={max_length}; raise max_length or use smaller images."
            )
        seq_shape = tuple(enc["input_ids"].shape)  # token-aligned tensors are [1, T]; image tensors are not
        enc = {k: v[:, :max_length] if tuple(v.shape) == seq_shape else v for k, v in enc.items()}
        ids = enc["input_ids"][0]
    labels = ids.clone()
    labels[:n_prompt] = -100
    if int((labels != -100).sum()) == 0:
        raise CalibrationDataError(f"calibration row {index}: no answer token left after tokenization.")
    return CalibrationSample(inputs=dict(enc), labels=labels.unsqueeze(0))


def check_processor(config: Any, processor: Any, samples: Sequence[CalibrationSample] = ()) -> None:
    """Refuse a processor that does not belong to the model ``config`` describes: it needs a tokenizer and an
    image processor, its encoded ``samples`` must carry the model's image token, and no token id may be beyond
    the model's embedding."""
    fix = "pass the model's own processor: TLQConfig(processor=AutoProcessor.from_pretrained(<model path>))"
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise CalibrationDataError(
            f"the calibration processor ({type(processor).__name__}) has no tokenizer and image processor; {fix}."
        )
    image_id = next(
        (v for k in ("image_token_id", "image_token_index") if isinstance(v := getattr(config, k, None), int)), None
    )
    vocab = getattr(config.get_text_config(decoder=True), "vocab_size", None)
    for k, sample in enumerate(samples):
        ids = sample.inputs["input_ids"]
        if isinstance(vocab, int) and int(ids.max()) >= vocab:
            raise CalibrationDataError(
                f"calibration sample {k} has token id {int(ids.max())}, the model embeds {vocab} tokens: the "
                f"processor belongs to another model; {fix}."
            )
        if image_id is not None and not bool((ids == image_id).any()):
            raise CalibrationDataError(
                f"calibration sample {k} has an image but not the model's image token (id {image_id}): the "
                f"processor belongs to another model; {fix}."
            )


def build_calibration_set(
    rows: Sequence[dict] | Iterable[dict],
    processor: Any,
    num_samples: int,
    max_length: int | None = None,
    seed: int = 0,
) -> list[CalibrationSample]:
    """Select ``num_samples`` rows (seeded shuffle) and encode each through ``processor``."""
    rows = load_rows(rows)
    n = len(rows)
    if n == 0:
        raise CalibrationDataError("the calibration dataset is empty.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = order[: min(num_samples, n)]
    if len(chosen) < num_samples:
        logger.warning("calibration: %d rows available, %d requested; using all of them", n, num_samples)
    return [_encode(processor, dict(rows[i]), i, max_length) for i in chosen]
