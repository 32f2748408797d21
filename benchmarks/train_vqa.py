"""Train the two small benchmark VLMs (LLaVA and Qwen2-VL architectures) on the synthetic VQA task.

    python benchmarks/train_vqa.py --model llava|qwen2vl|all          # train, save, verify, report
    python benchmarks/train_vqa.py --model all --verify               # only re-check the saved models

Each model is built offline with :func:`tlq_hf.testing.tiny_models.build_vlm` (word-level tokenizer over the task
vocabulary, the family's real chat template and processor), then trained in two phases:

1. vision pre-training: the vision tower and projector learn the colour, the shape and the index of every
   grid cell through a linear head on the projected image features (one image token per cell); the
   projector output is then rescaled so that image tokens enter the language model at a text-like scale;
2. VQA training on a stream of fresh training items (every item is seen once: the task is data-limited,
   a fixed set of 48k items repeated for three epochs over-fitted at ~77 % held-out accuracy), each
   encoded by :func:`tlq_hf.data.build_calibration_set` (so the sequences and answer labels are exactly
   the calibration format), batched with the tokenizer's (left) padding; the cell head stays on as an
   auxiliary loss.

The model and processor are saved with ``save_pretrained`` under ``benchmarks/models/<name>/`` and reload
offline through ``AutoModelForImageTextToText`` / ``AutoProcessor``. Recipe, training curve and held-out
accuracy go to ``benchmarks/results/train_vqa_<name>.json`` and ``benchmarks/results/train_vqa.md``; the
held-out accuracy is re-measured in a fresh process from the saved folder. ``--model all`` trains the two
models in parallel subprocesses with one torch thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reading_task  # noqa: E402
import vqa_task  # noqa: E402
from provenance import Measurement  # noqa: E402

from tlq_hf.data import build_calibration_set  # noqa: E402
from tlq_hf.testing.tiny_models import build_vlm, load_auto_class  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"
RESULTS_DIR = BENCH_DIR / "results"
HELDOUT_SEED = 0
#: Weight files are written in shards of at most this size (the repository keeps every tracked file small).
MAX_SHARD = "16MB"
#: The synthetic tasks a model can be trained on; both modules share one interface (see ``reading_task``).
TASKS: dict[str, Any] = {"shapes": vqa_task, "reading": reading_task}

# --------------------------------------------------------------------------- #
# Recipes
# --------------------------------------------------------------------------- #

#: Decoder shared by both models: every decoder linear has in_features 256 or 512 (multiples of 128).
_TEXT = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
_SIDE = vqa_task.IMAGE_SIZE
_CELL = vqa_task.CELL
#: A small ViT (CLIP or SigLIP) with one 32-px patch per grid cell: 9 patch tokens.
_VIT = {
    "image_size": _SIDE,
    "patch_size": _CELL,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
#: LLaVA's config / image processor / processor settings for that tower (9 image tokens, class token dropped).
_LLAVA_IO: dict[str, Any] = {
    "config": {"image_seq_length": (_SIDE // _CELL) ** 2, "vision_feature_layer": -1},
    "image_processor": {"size": {"shortest_edge": _SIDE}, "crop_size": {"height": _SIDE, "width": _SIDE}},
    "processor": {"patch_size": _CELL},
}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines one trained model."""

    name: str  # folder and result-file name
    family: str  # tiny_models family
    architecture: str  # transformers model class (for the report)
    text: dict[str, Any]  # decoder dimensions
    vision: dict[str, Any]  # vision_config overrides
    config: dict[str, Any] = field(default_factory=dict)  # top-level config overrides
    image_processor: dict[str, Any] = field(default_factory=dict)
    processor: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    task: str = "shapes"  # key of TASKS
    # phase 1: vision pre-training on per-cell attributes (colour, shape and the cell's own position)
    pretrain_steps: int = 500
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    position_embedding_std: float | None = None  # re-initialise a ViT's absolute position embeddings
    feature_norm: float | None = 1.0  # then rescale the projector so image tokens have this mean norm
    # phase 2: VQA training on fresh items (steps x batch_size of them), encoded in chunks
    chunk_items: int = 1600
    steps: int = 5000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    aux_weight: float = 0.2
    autocast_bf16: bool = True  # bfloat16 autocast for the training forward/backward (weights stay float32)
    train_attention: str = "sdpa"  # attention implementation while training (saved models load with the default)
    # evaluation
    eval_every: int = 250
    log_every: int = 50
    curve_items: int = 512  # first items of the held-out set, for the curve
    heldout_items: int = 3000
    save_dtype: str = "float32"


RECIPES: dict[str, Recipe] = {
    "llava": Recipe(
        name="llava-vqa",
        family="llava",
        architecture="LlavaForConditionalGeneration",
        text=_TEXT,
        # CLIP tower with one 32-px patch per grid cell: 9 image tokens (the class token is dropped).
        vision=_VIT,
        **_LLAVA_IO,
        # unit-scale position embeddings: the cell position survives into the image tokens
        position_embedding_std=1.0,
    ),
    "qwen2vl": Recipe(
        name="qwen2vl-vqa",
        family="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        text=_TEXT,
        # 16-px patches merged 2 x 2: one merged token per 32-px grid cell, 9 image tokens.
        vision={"depth": 2, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 2, "patch_size": _CELL // 2},
        image_processor={"patch_size": _CELL // 2, "min_pixels": (_SIDE // 2) ** 2, "max_pixels": _SIDE**2},
        steps=4500,  # a step costs about 1.3x LLaVA's (twice the encoding, a slower vision tower)
        # eager attention trains faster here: the vision tower attends per image, in many tiny calls
        train_attention="eager",
    ),
    "qwen2_5vl": Recipe(
        name="qwen2_5vl-vqa",
        family="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        text=_TEXT,
        # 16-px patches merged 2 x 2 as for Qwen2-VL; 64-px attention windows (2 x 2 merged tokens) in the
        # first block, full attention in the last, as in the released models.
        vision={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "patch_size": _CELL // 2,
            "window_size": 2 * _CELL,
            "fullatt_block_indexes": [1],
        },
        image_processor={"patch_size": _CELL // 2, "min_pixels": (_SIDE // 2) ** 2, "max_pixels": _SIDE**2},
        steps=6500,  # what Qwen2-VL needed in all (4500 + 2000 continued)
        train_attention="eager",
    ),
    "onevision": Recipe(
        name="onevision-vqa",
        family="llava_onevision",
        architecture="LlavaOnevisionForConditionalGeneration",
        text=_TEXT,
        # SigLIP tower, one 32-px patch per grid cell; one any-resolution tile (the 96-px image itself), so
        # the language model sees the base image (9 tokens) and the tile (3 x 3 + 3 row newlines).
        vision=_VIT,
        config={"image_grid_pinpoints": [[_SIDE, _SIDE]]},
        image_processor={"size": {"height": _SIDE, "width": _SIDE}, "image_grid_pinpoints": [[_SIDE, _SIDE]]},
        processor={"num_image_tokens": (_SIDE // _CELL) ** 2},
        position_embedding_std=1.0,
    ),
    # the deeper model: LLaVA with 12 decoder layers, where error accumulates through the stack
    "llava-deep": Recipe(
        name="llava-deep-vqa",
        family="llava",
        architecture="LlavaForConditionalGeneration",
        text={**_TEXT, "num_hidden_layers": 12},
        vision=_VIT,
        **_LLAVA_IO,
        position_embedding_std=1.0,
    ),
    "gemma3": Recipe(
        name="gemma3-vqa",
        family="gemma3",
        architecture="Gemma3ForConditionalGeneration",
        text=_TEXT,
        # SigLIP tower, one 32-px patch per grid cell, pooled 1:1 to 9 image tokens
        vision=_VIT,
        config={"mm_tokens_per_image": (_SIDE // _CELL) ** 2},
        image_processor={"size": {"height": _SIDE, "width": _SIDE}},
        processor={"image_seq_length": (_SIDE // _CELL) ** 2},
        position_embedding_std=1.0,
    ),
    # a mixture-of-experts decoder: every decoder MLP is 4 experts, top-2 routed (Qwen3-VL-MoE's own classes);
    # deepstack off (its between-layer visual injection is not replayed by layer-wise calibration yet)
    "qwen3vlmoe": Recipe(
        name="qwen3vlmoe-vqa",
        family="qwen3_vl_moe",
        architecture="Qwen3VLMoeForConditionalGeneration",
        # two active experts of width 256: the active MLP is as wide as the dense models' (512)
        text={**_TEXT, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256},
        # 16-px patches merged 2 x 2 as for Qwen2.5-VL: one merged token per 32-px cell, 9 image tokens;
        # learned position embeddings on the 6 x 6 patch grid
        vision={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "patch_size": _CELL // 2,
            "num_position_embeddings": (_SIDE // (_CELL // 2)) ** 2,
        },
        image_processor={"patch_size": _CELL // 2, "min_pixels": (_SIDE // 2) ** 2, "max_pixels": _SIDE**2},
        steps=5000,
        train_attention="eager",
    ),
    # the other task mix: reading coloured digits and letters, comparing digits
    "llava-read": Recipe(
        name="llava-read-vqa",
        family="llava",
        architecture="LlavaForConditionalGeneration",
        text=_TEXT,
        # reading a character from one 32-px patch takes a wider tower than telling shapes apart (with the
        # shapes recipe's tower, pre-training stalled at 58 % of cells right and VQA at the text prior)
        vision={
            "image_size": _SIDE,
            "patch_size": _CELL,
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        pretrain_steps=1000,
        **_LLAVA_IO,
        position_embedding_std=1.0,
        task="reading",
    ),
}

# --------------------------------------------------------------------------- #
# Model plumbing
# --------------------------------------------------------------------------- #


def _num_cells() -> int:
    return vqa_task.GRID * vqa_task.GRID


class CellHead(nn.Module):
    """Linear read-outs from each cell's projected image token: the colour and shape (class 0 = empty) of
    the cell and of its four neighbours (the rows of :func:`vqa_task.cell_targets`), and the cell's own
    index, so that image tokens say what they show, what is next to them and where they are. Features are
    layer-normalised first, so the loss does not push their scale up."""

    def __init__(self, width: int, class_counts: tuple[int, int]) -> None:
        super().__init__()
        n_colors, n_shapes = class_counts
        rows = 2 * (1 + len(vqa_task.RELATIONS))
        self.attributes = nn.ModuleList(nn.Linear(width, n_colors if k % 2 == 0 else n_shapes) for k in range(rows))
        self.cell = nn.Linear(width, _num_cells())

    def loss_and_accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Summed cross-entropies for ``features [B, cells, width]`` against ``targets [B, rows, cells]`` and
        the cell indices, and the fraction of cells whose own colour and shape are both right."""
        features = F.layer_norm(features.float(), features.shape[-1:])
        cells = torch.arange(_num_cells()).expand(features.shape[0], -1)
        loss = F.cross_entropy(self.cell(features).flatten(0, 1), cells.flatten())
        predictions = []
        for k, head in enumerate(self.attributes):
            logits = head(features)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), targets[:, k].flatten())
            predictions.append(logits.argmax(-1))
        own = (predictions[0] == targets[:, 0]) & (predictions[1] == targets[:, 1])
        return loss, float(own.float().mean())


class FeatureTap:
    """Captures the image features the projector hands to the language model, one per grid cell.

    Hooks LLaVA's ``multi_modal_projector`` or Qwen2-VL's ``visual.merger``, so the same features serve the
    pre-training head and the auxiliary loss during VQA training without an extra vision forward.
    """

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        module = getattr(inner, "multi_modal_projector", None)
        if module is None:
            module = inner.visual.merger
        self._output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._output = output

    def cells(self, images: int) -> torch.Tensor:
        """The last captured features of ``images`` images as ``[images, cells, width]`` (cells in raster
        order). Where the projector saw several views of each image (LLaVA-OneVision's base image and its
        any-resolution tiles, base first), the base view's."""
        if self._output is None:
            raise RuntimeError("no image features captured yet")
        return self._output.reshape(images, -1, _num_cells(), self._output.shape[-1])[:, 0]

    def close(self) -> None:
        self._handle.remove()


def _vision_forward(model: nn.Module, pixel_inputs: dict[str, torch.Tensor]) -> None:
    """Run the vision tower and projector only (the :class:`FeatureTap` keeps the result)."""
    config = model.config
    # LLaVA-style configs choose the vision layer and token selection; Qwen-VL towers take the grid instead
    chosen = ("vision_feature_layer", "vision_feature_select_strategy")
    extra = {k: getattr(config, k) for k in chosen if getattr(config, k, None) is not None}
    model.model.get_image_features(**pixel_inputs, **extra)


def _vision_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith(("model.language_model.", "lm_head."))]


def _task(recipe: Recipe) -> Any:
    """The task module ``recipe`` trains on."""
    return TASKS[recipe.task]


def _class_counts(task: Any) -> tuple[int, int]:
    """Cell-head classes (colours + empty, objects + empty) of ``task``."""
    return getattr(task, "CLASS_COUNTS", (len(vqa_task.COLORS) + 1, len(vqa_task.SHAPES) + 1))


def _cell_targets(items: Sequence[dict[str, Any]], task: Any) -> torch.Tensor:
    """``[B, rows, cells]`` classes of each item's scene (the rows of the task's ``cell_targets``)."""
    return torch.tensor([task.cell_targets(item["scene"]) for item in items], dtype=torch.long)


@dataclass
class TrainingSet:
    """Training items encoded once by :func:`build_calibration_set`, kept without their image tensors.

    The token-aligned tensors and labels of each item are kept as encoded; pixel tensors are recomputed
    per batch by the processor's own image processor (batched), which :func:`encode_training_set` checks to
    be identical to the per-item encoding, and which keeps memory at the size of the PIL images.
    """

    tokens: list[dict[str, torch.Tensor]]  # per item: input_ids, attention_mask, ... and labels, [1, T]
    images: list[Any]  # per item: the PIL image
    targets: torch.Tensor  # [N, rows, cells] per-cell classes (see _cell_targets)
    rows: list[dict[str, str]]  # per item: question, answer, type (for the text-only prior)

    def __len__(self) -> int:
        return len(self.images)


def _image_inputs(processor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    # only what the processor hands the model (Gemma 3's image processor also returns its crop counts)
    out = processor.image_processor(images=list(images), return_tensors="pt")
    return {k: v for k, v in out.items() if k in processor.model_input_names}


def encode_training_set(
    items: Sequence[dict[str, Any]], processor: Any, check: int = 64, task: Any = vqa_task
) -> TrainingSet:
    """Encode every item with :func:`build_calibration_set` (one row at a time, so the order is kept).

    The first ``check`` items' image tensors are compared with the batched image processor's output,
    which training then uses; a mismatch raises ``RuntimeError``.
    """
    tokens, image_tensors = [], []
    check = min(check, len(items))
    for index, item in enumerate(items):
        sample = build_calibration_set([item], processor, 1)[0]
        shape = sample.inputs["input_ids"].shape
        tokens.append({k: v for k, v in sample.inputs.items() if v.shape == shape} | {"labels": sample.labels})
        if index < check:
            image_tensors.append({k: v for k, v in sample.inputs.items() if v.shape != shape})
    batched = _image_inputs(processor, [item["image"] for item in items[:check]]) if check else {}
    for key, value in batched.items():
        reference = torch.cat([t[key] for t in image_tensors])
        if not torch.equal(reference, value):
            raise RuntimeError(f"batched image processing differs from build_calibration_set for {key!r}")
    return TrainingSet(
        tokens=tokens,
        images=[item["image"] for item in items],
        targets=_cell_targets(items, task),
        rows=[{"question": it["question"], "answer": it["answer"], "type": it["type"]} for it in items],
    )


def training_batch(data: TrainingSet, indices: Sequence[int], processor: Any) -> dict[str, torch.Tensor]:
    """Model inputs (with ``labels``) for ``data[indices]``: token tensors padded on the tokenizer's side
    (``pad_token_id`` for ``input_ids``, 0 for masks and token types, -100 for labels), image tensors from
    the batched image processor."""
    tokenizer = processor.tokenizer
    length = max(data.tokens[i]["input_ids"].shape[-1] for i in indices)
    batch: dict[str, torch.Tensor] = {}
    for key in data.tokens[indices[0]]:
        fill = tokenizer.pad_token_id if key == "input_ids" else -100 if key == "labels" else 0
        out = torch.full((len(indices), length), fill, dtype=data.tokens[indices[0]][key].dtype)
        for row, i in enumerate(indices):
            values = data.tokens[i][key][0]
            if tokenizer.padding_side == "left":
                out[row, length - len(values) :] = values
            else:
                out[row, : len(values)] = values
        batch[key] = out
    return batch | _image_inputs(processor, [data.images[i] for i in indices])


def _lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _log(name: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", flush=True)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _pretrain_vision(
    model: nn.Module, processor: Any, head: CellHead, tap: FeatureTap, recipe: Recipe
) -> dict[str, Any]:
    """Phase 1: train the vision tower, projector and cell head on per-cell colour, shape and position.

    Fresh training images every step; afterwards the projector's output layer is rescaled so that image
    tokens enter the language model with mean norm ``recipe.feature_norm`` (the head is scale-invariant).
    """
    if recipe.position_embedding_std is not None:
        with torch.no_grad():
            tower = model.model.vision_tower
            names = [n for n, _ in tower.named_modules() if n.endswith("embeddings.position_embedding")]
            tower.get_submodule(names[0]).weight.normal_(0.0, recipe.position_embedding_std)
    params = _vision_parameters(model) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.pretrain_lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / recipe.pretrain_steps))
    )
    model.train()
    curve, start, window = [], time.time(), []
    for step in range(recipe.pretrain_steps):
        items = _task(recipe).make_items(
            recipe.pretrain_batch, recipe.seed, "train", start=step * recipe.pretrain_batch
        )
        _vision_forward(model, _image_inputs(processor, [item["image"] for item in items]))
        loss, accuracy = head.loss_and_accuracy(tap.cells(len(items)), _cell_targets(items, _task(recipe)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append((loss.item(), accuracy))
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.pretrain_steps:
            mean_loss = sum(w[0] for w in window) / len(window)
            mean_acc = sum(w[1] for w in window) / len(window)
            curve.append(
                {
                    "step": step + 1,
                    "elapsed_s": round(time.time() - start, 1),
                    "loss": mean_loss,
                    "cell_accuracy": mean_acc,
                }
            )
            _log(recipe.name, f"pretrain {step + 1}/{recipe.pretrain_steps} loss {mean_loss:.3f} cells {mean_acc:.3f}")
            window = []
    scale = None
    if recipe.feature_norm is not None:
        scale = _rescale_image_features(model, processor, tap, recipe)
    return {
        "steps": recipe.pretrain_steps,
        "wall_s": round(time.time() - start, 1),
        "curve": curve,
        "final_cell_accuracy": curve[-1]["cell_accuracy"],
        "feature_rescale": scale,
    }


@torch.no_grad()
def _rescale_image_features(model: nn.Module, processor: Any, tap: FeatureTap, recipe: Recipe) -> float:
    """Scale the projector's output weights so image tokens have mean norm ``recipe.feature_norm``."""
    inner = model.model
    projector = getattr(inner, "multi_modal_projector", None)
    if projector is None:  # Qwen-VL: the merger's last linear (``mlp[-1]``; Qwen3-VL's ``linear_fc2``)
        merger = inner.visual.merger
        last = merger.linear_fc2 if hasattr(merger, "linear_fc2") else merger.mlp[-1]
        outputs = [last.weight, last.bias]
    elif hasattr(projector, "linear_2"):  # LLaVA, LLaVA-OneVision
        outputs = [projector.linear_2.weight, projector.linear_2.bias]
    else:  # Gemma 3: normalised pooled features times one projection matrix
        outputs = [projector.mm_input_projection_weight]
    items = _task(recipe).make_items(recipe.pretrain_batch, recipe.seed, "train")
    images = _image_inputs(processor, [item["image"] for item in items])
    model.eval()
    _vision_forward(model, images)
    scale = recipe.feature_norm / float(tap.cells(len(items)).float().norm(dim=-1).mean())
    for tensor in outputs:
        tensor.mul_(scale)
    return scale


class TrainingStream:
    """Fresh training items, ``chunk_items`` at a time, from the train stream starting at index ``first``.

    Each chunk is generated and encoded by :func:`encode_training_set` when the previous one is used up;
    the first chunk also checks batched against per-item image processing. Encoding time and the
    question/answer rows (for the text-only prior) are kept.
    """

    def __init__(self, recipe: Recipe, processor: Any, first: int) -> None:
        self.recipe, self.processor, self.next_index = recipe, processor, first
        self.rows: list[dict[str, str]] = []
        self.encode_s = 0.0
        self._chunk: TrainingSet | None = None
        self._used = 0

    def batch(self, size: int) -> tuple[TrainingSet, list[int]]:
        """The next ``size`` unseen items as ``(chunk, indices into it)``."""
        if self._chunk is None or self._used + size > len(self._chunk):
            t0 = time.time()
            n = max(self.recipe.chunk_items, size)
            task = _task(self.recipe)
            items = task.make_items(n, self.recipe.seed, "train", start=self.next_index)
            self._chunk = encode_training_set(items, self.processor, check=64 if not self.rows else 0, task=task)
            self.rows += self._chunk.rows
            self.next_index += n
            self._used = 0
            self.encode_s += time.time() - t0
        indices = list(range(self._used, self._used + size))
        self._used += size
        return self._chunk, indices


def _train_vqa(
    model: nn.Module,
    processor: Any,
    head: CellHead,
    tap: FeatureTap,
    recipe: Recipe,
    stream: TrainingStream,
    curve_items: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Phase 2: answer-token cross-entropy (+ auxiliary cell loss), one pass over fresh items."""
    named = list(model.named_parameters()) + [(f"cell_head.{n}", p) for n, p in head.named_parameters()]
    optimizer = torch.optim.AdamW(
        _param_groups(named, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas, foreach=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    params = [p for _, p in named]
    curve: list[dict[str, Any]] = []
    window: list[tuple[float, float, float]] = []
    start = time.time()
    for step in range(recipe.steps):
        model.train()
        data, indices = stream.batch(recipe.batch_size)
        batch = training_batch(data, indices, processor)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.autocast_bf16):
            out = model(**batch)
        aux, cell_accuracy = head.loss_and_accuracy(tap.cells(len(indices)), data.targets[indices])
        loss = out.loss.float() + recipe.aux_weight * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append((out.loss.item(), aux.item(), cell_accuracy))
        last = step + 1 == recipe.steps
        if (step + 1) % recipe.log_every == 0 or last:
            point = {
                "step": step + 1,
                "samples": (step + 1) * recipe.batch_size,
                "elapsed_s": round(time.time() - start, 1),
                "lr": schedule.get_last_lr()[0],
                "answer_loss": sum(w[0] for w in window) / len(window),
                "cell_loss": sum(w[1] for w in window) / len(window),
                "cell_accuracy": sum(w[2] for w in window) / len(window),
            }
            window = []
            message = (
                f"step {step + 1}/{recipe.steps} loss {point['answer_loss']:.3f} cells {point['cell_accuracy']:.3f}"
            )
            if (step + 1) % recipe.eval_every == 0 or last:
                result = vqa_task.evaluate(model, processor, curve_items, batch_size=128)
                point["heldout_accuracy"] = result["accuracy"]
                point["heldout_by_group"] = result["by_group"]
                groups = " ".join(f"{g} {a:.2f}" for g, a in result["by_group"].items())
                message += f" | held-out {result['accuracy']:.3f} ({groups})"
            curve.append(point)
            _log(recipe.name, f"{message} [{point['elapsed_s']:.0f}s]")
    return {
        "steps": recipe.steps,
        "samples": recipe.steps * recipe.batch_size,
        "unique_items": recipe.steps * recipe.batch_size,
        "epochs": 1.0,
        "encode_s": round(stream.encode_s, 1),
        "wall_s": round(time.time() - start, 1),
        "curve": curve,
    }


def _heldout(recipe: Recipe) -> list[dict[str, Any]]:
    return _task(recipe).make_items(recipe.heldout_items, HELDOUT_SEED, "test")


def _evaluate_saved(path: Path, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Held-out accuracy of the model saved at ``path``, loaded through the Auto classes."""
    model = load_auto_class().from_pretrained(path, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(path)
    result = vqa_task.evaluate(model, processor, items, batch_size=128)
    return {k: result[k] for k in ("accuracy", "by_group", "by_type")} | {"n": len(items)}


def _check_tokenizer(path: Path, items: Sequence[dict[str, Any]], task: Any) -> None:
    """The reloaded tokenizer knows every task word and encodes every question and answer without <unk>."""
    tokenizer = transformers.AutoProcessor.from_pretrained(path).tokenizer
    texts = list(task.vocabulary()) + [f"{it['question']} {it['answer']}" for it in items]
    bad = [t for t in texts if tokenizer.unk_token_id in tokenizer(t, add_special_tokens=False)["input_ids"]]
    if bad:
        raise RuntimeError(f"{path}: the saved tokenizer maps words to <unk> in e.g. {bad[:3]}")


def _folder_bytes(path: Path) -> dict[str, int]:
    files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
    return {"total": sum(files.values()), "weights": sum(v for k, v in files.items() if k.endswith(".safetensors"))}


def _save(model: nn.Module, processor: Any, recipe: Recipe, heldout: Sequence[dict[str, Any]]) -> Path:
    """Save model (default attention, ``recipe.save_dtype``) and processor under ``MODELS_DIR/<name>``, then
    check that the reloaded tokenizer knows every word of ``heldout``."""
    path = MODELS_DIR / recipe.name
    path.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("sdpa")
    model.to(getattr(torch, recipe.save_dtype)).eval()
    model.save_pretrained(path, max_shard_size=MAX_SHARD)
    processor.save_pretrained(path)
    _check_tokenizer(path, heldout, _task(recipe))
    return path


def train(recipe: Recipe, threads: int) -> dict[str, Any]:
    """Build, train, save and evaluate one model; write its JSON record and return it."""
    torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    wall = time.time()
    measured = Measurement("python benchmarks/train_vqa.py " + " ".join(sys.argv[1:]))
    model, processor = build_vlm(
        recipe.family,
        extra_words=_task(recipe).vocabulary(),
        text=recipe.text,
        vision=recipe.vision,
        config=recipe.config,
        image_processor=recipe.image_processor,
        processor=recipe.processor,
        seed=recipe.seed,
    )
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "language_model": sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.language_model.")),
        "lm_head": model.lm_head.weight.numel(),
    }
    counts["vision_and_projector"] = counts["total"] - counts["language_model"] - counts["lm_head"]
    _log(recipe.name, f"built {recipe.architecture}: {counts['total'] / 1e6:.2f}M parameters")
    heldout = _heldout(recipe)
    curve_items = heldout[: recipe.curve_items]
    head = CellHead(model.config.text_config.hidden_size, _class_counts(_task(recipe)))
    tap = FeatureTap(model)
    model.set_attn_implementation(recipe.train_attention)

    pretrain = _pretrain_vision(model, processor, head, tap, recipe)
    # Training items come from the train stream after the pre-training images (indices are disjoint).
    stream = TrainingStream(recipe, processor, first=recipe.pretrain_steps * recipe.pretrain_batch)
    vqa = _train_vqa(model, processor, head, tap, recipe, stream, curve_items)
    tap.close()

    path = _save(model, processor, recipe, heldout)
    train_wall = round(time.time() - wall, 1)

    final = _evaluate_saved(path, heldout)
    prior = _task(recipe).TextPrior(stream.rows)
    prior_correct = [prior.predict(item) == item["answer"] for item in heldout]
    record = {
        **measured.record(),
        "model": recipe.name,
        "architecture": recipe.architecture,
        "path": str(path.relative_to(BENCH_DIR.parent)),
        "recipe": dataclasses.asdict(recipe),
        "parameters": counts,
        "bytes_on_disk": _folder_bytes(path),
        "saved_dtype": recipe.save_dtype,
        "image_tokens": _num_cells(),
        "torch_threads": threads,
        "wall_s": {
            "pretrain": pretrain["wall_s"],
            "encode": vqa["encode_s"],
            "vqa": vqa["wall_s"],
            "build_train_save": train_wall,
            "total": round(time.time() - wall, 1),
        },
        "pretrain": pretrain,
        "training": vqa,
        "heldout": final,
        "heldout_type_share": {
            t: sum(i["type"] == t for i in heldout) / len(heldout) for t in _task(recipe).QUESTION_TYPES
        },
        "text_prior": {
            "accuracy": sum(prior_correct) / len(prior_correct),
            "by_group": vqa_task.accuracy_by(heldout, prior_correct, "group"),
            "by_type": vqa_task.accuracy_by(heldout, prior_correct, "type"),
            "train_items": len(stream.rows),
        },
    }
    _write_json(recipe, record)
    _log(
        recipe.name,
        f"held-out accuracy {final['accuracy']:.4f} on {final['n']} items; "
        f"text-only prior {record['text_prior']['accuracy']:.4f}; total {record['wall_s']['total']:.0f}s",
    )
    return record


def continue_training(recipe: Recipe, steps: int, threads: int, lr: float | None = None) -> dict[str, Any]:
    """Train the saved model ``steps`` more VQA steps on the next unseen items of the train stream.

    A warm restart of the learning-rate schedule (warm-up, cosine), without the auxiliary cell loss (the
    cell head is not part of the saved model); the model is saved over the old one, re-evaluated, and the
    phase is appended to its JSON record under ``continued``.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed + 1)
    record = json.loads(_json_path(recipe).read_text())
    rc = record["recipe"]
    first = rc["pretrain_steps"] * rc["pretrain_batch"] + record["training"]["samples"]
    first += sum(phase["samples"] for phase in record.get("continued", []))
    path = MODELS_DIR / recipe.name
    model = load_auto_class().from_pretrained(path, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(path)
    phase = dataclasses.replace(recipe, steps=steps, aux_weight=0.0, lr=lr or recipe.lr)
    head = CellHead(model.config.text_config.hidden_size, _class_counts(_task(recipe)))
    tap = FeatureTap(model)
    model.set_attn_implementation(recipe.train_attention)
    heldout = _heldout(recipe)
    stream = TrainingStream(phase, processor, first=first)
    _log(recipe.name, f"continuing for {steps} steps from train item {first}")
    vqa = _train_vqa(model, processor, head, tap, phase, stream, heldout[: recipe.curve_items])
    tap.close()
    _save(model, processor, recipe, heldout)
    final = _evaluate_saved(path, heldout)
    record["continued"] = record.get("continued", []) + [vqa | {"first_item": first, "lr": phase.lr}]
    record["heldout"] = final
    record["bytes_on_disk"] = _folder_bytes(path)
    record["wall_s"]["continued"] = record["wall_s"].get("continued", 0.0) + vqa["wall_s"]
    record.pop("verified", None)
    _write_json(recipe, record)
    _log(recipe.name, f"held-out accuracy {final['accuracy']:.4f} on {final['n']} items after continuing")
    return record


# --------------------------------------------------------------------------- #
# Verification and reports
# --------------------------------------------------------------------------- #


def _json_path(recipe: Recipe) -> Path:
    return RESULTS_DIR / f"train_vqa_{recipe.name.removesuffix('-vqa')}.json"


def _write_json(recipe: Recipe, record: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    _json_path(recipe).write_text(json.dumps(record, indent=1) + "\n")


def verify(recipe: Recipe, threads: int) -> dict[str, Any]:
    """Reload the saved model in this (fresh) process, re-measure the held-out accuracy and record it."""
    torch.set_num_threads(threads)
    record = json.loads(_json_path(recipe).read_text())
    path = MODELS_DIR / recipe.name
    heldout = _heldout(recipe)
    _check_tokenizer(path, heldout, _task(recipe))
    result = _evaluate_saved(path, heldout)
    match = abs(result["accuracy"] - record["heldout"]["accuracy"]) < 1e-9
    record["verified"] = {"accuracy": result["accuracy"], "n": result["n"], "matches_training_run": match}
    _write_json(recipe, record)
    _log(recipe.name, f"verified from {path}: {result['accuracy']:.4f} (recorded {record['heldout']['accuracy']:.4f})")
    if not match:
        raise SystemExit(f"{recipe.name}: reloaded accuracy differs from the recorded one")
    return record


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _accuracy_table(name: str, task: Any, records: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: held-out accuracy per question group and type of the models trained on ``task``."""
    if not records:
        return []
    groups = list(records[0]["heldout"]["by_group"])
    types = list(records[0]["heldout"]["by_type"])
    lines = ["", f"## Task `{name}`: held-out accuracy per question group and type (%; prior in parentheses)", ""]
    lines += [
        "| question | share | " + " | ".join(r["model"] for r in records) + " |",
        "|---|---|" + "---|" * len(records),
    ]
    share = records[0]["heldout_type_share"]
    by_group_share = {g: 0.0 for g in groups}
    for t, s in share.items():
        by_group_share[task._TYPES[t][0]] += s  # noqa: SLF001 - the group of each type
    for g in groups:
        cells = [f"{_pct(r['heldout']['by_group'][g])} ({_pct(r['text_prior']['by_group'][g])})" for r in records]
        lines.append(f"| **{g}** | {_pct(by_group_share[g])} % | " + " | ".join(cells) + " |")
    for t in sorted(types, key=lambda t: (groups.index(task._TYPES[t][0]), t)):  # noqa: SLF001
        cells = [f"{_pct(r['heldout']['by_type'][t])} ({_pct(r['text_prior']['by_type'][t])})" for r in records]
        lines.append(f"| {t} | {_pct(share[t])} % | " + " | ".join(cells) + " |")
    return lines


def write_markdown() -> Path:
    """Summarise every available ``train_vqa_*.json`` into ``benchmarks/results/train_vqa.md``."""
    records = [json.loads(_json_path(r).read_text()) for r in RECIPES.values() if _json_path(r).exists()]
    lines = [
        "# Trained tiny VLMs for the quality table",
        "",
        "Synthetic visual QA, single-word answers, 96x96 scenes in a 3x3 grid, half over faded `skimage.data` photos:",
        "task `shapes` (`benchmarks/vqa_task.py`: 3-7 shapes, 5 colours x 4 shapes; attribute, count, compare and",
        "relation questions) or `reading` (`benchmarks/reading_task.py`: 3-6 coloured digits and letters; read, count,",
        "digit comparison and relation questions). Trained and saved by `benchmarks/train_vqa.py`.",
        "Accuracy = greedy first answer token on held-out items (test split, never drawn from the train stream).",
        "Text-only prior = majority answer per question text (seen >= 20 times in training) else per question type,",
        "learned on the model's own training items.",
        "",
        "| model | task | architecture | decoder layers | params | on disk | FP held-out acc. | text-only prior "
        "| items | train wall | total wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        verified = r.get("verified", {})
        check = " (reloaded: same)" if verified.get("matches_training_run") else ""
        extra = r["wall_s"].get("continued", 0.0)  # continued training, when there was any
        lines.append(
            f"| {r['model']} | {r['recipe'].get('task', 'shapes')} | {r['architecture']} "
            f"| {r['recipe']['text']['num_hidden_layers']} | {r['parameters']['total'] / 1e6:.2f}M "
            f"| {r['bytes_on_disk']['weights'] / 2**20:.1f} MiB {r['saved_dtype']} "
            f"| **{_pct(r['heldout']['accuracy'])} %**{check} | {_pct(r['text_prior']['accuracy'])} % "
            f"| {r['heldout']['n']} | {(r['wall_s']['build_train_save'] + extra) / 60:.1f} min "
            f"| {(r['wall_s']['total'] + extra) / 60:.1f} min |"
        )
    for name, task in TASKS.items():
        lines += _accuracy_table(name, task, [r for r in records if r["recipe"].get("task", "shapes") == name])
    if records:
        lines += ["", "## Recipe", ""]
        for r in records:
            rc = r["recipe"]
            t = rc["text"]
            lines += [
                f"**{r['model']}** ({r['architecture']}): decoder {t['num_hidden_layers']} layers, hidden "
                f"{t['hidden_size']}, MLP {t['intermediate_size']}, {t['num_attention_heads']} heads "
                f"({t['num_key_value_heads']} KV); vision {json.dumps(rc['vision'])}; {r['image_tokens']} image "
                f"tokens; parameters {json.dumps(r['parameters'])}.",
                f"Phase 1: {rc['pretrain_steps']} steps x {rc['pretrain_batch']} fresh images; vision tower + "
                f"projector + linear cell head (colour, shape and index of each cell), AdamW lr {rc['pretrain_lr']}; "
                f"final cell accuracy {_pct(r['pretrain']['final_cell_accuracy'])} %; position embeddings "
                f"re-initialised with std {rc['position_embedding_std']}; image tokens rescaled to mean norm "
                f"{rc['feature_norm']} ({r['wall_s']['pretrain'] / 60:.1f} min).",
                f"Phase 2: {r['training']['unique_items']} fresh training items (each seen once), encoded one by "
                f"one with `build_calibration_set` ({r['wall_s']['encode'] / 60:.1f} min of it), {rc['steps']} "
                f"steps x {rc['batch_size']}, left padding, loss on the answer tokens "
                f"+ {rc['aux_weight']} x cell loss; AdamW lr {rc['lr']} betas {tuple(rc['betas'])} wd "
                f"{rc['weight_decay']}, {rc['warmup_steps']} warm-up steps then cosine to {rc['min_lr_ratio']} x; "
                f"grad clip {rc['grad_clip']}; bf16 autocast {rc['autocast_bf16']}; seed {rc['seed']} "
                f"({r['wall_s']['vqa'] / 60:.1f} min).",
                *[
                    f"Continued: {c['steps']} more steps x {rc['batch_size']} on the next {c['samples']} unseen "
                    f"items (warm restart of the schedule at lr {c['lr']}, no cell loss; "
                    f"{c['wall_s'] / 60:.1f} min)."
                    for c in r.get("continued", [])
                ],
                f"Torch threads {r['torch_threads']}; torch {r['versions']['torch']}, transformers "
                f"{r['versions']['transformers']}.",
                "",
            ]
        lines += ["## Training curve (held-out accuracy on the first 512 held-out items)", ""]
        for r in records:
            phases = [r["training"]] + r.get("continued", [])
            offset, labels = 0, []
            for phase in phases:
                points = [p for p in phase["curve"] if "heldout_accuracy" in p]
                labels += [f"{offset + p['step']}: {_pct(p['heldout_accuracy'])} %" for p in points]
                offset += phase["steps"]
            lines.append(f"- {r['model']}: " + ", ".join(labels))
    path = RESULTS_DIR / "train_vqa.md"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _self_command(*args: str) -> list[str]:
    return [sys.executable, os.fspath(Path(__file__).resolve()), *args]


def _in_parallel(names: Sequence[str], passthrough: Sequence[str], what: str) -> None:
    """Run this script once per model name, all at once, with ``passthrough`` arguments; fail if any fails."""
    procs = [subprocess.Popen(_self_command("--model", name, *passthrough)) for name in names]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"{what} failed, exit codes {dict(zip(names, codes, strict=True))}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--verify", action="store_true", help="only reload the saved model(s) and re-check them")
    parser.add_argument("--no-verify", action="store_true", help="skip the fresh-process check after training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process (default 1)")
    parser.add_argument("--sequential", action="store_true", help="with --model all: one model after the other")
    parser.add_argument("--steps", type=int, help="override the recipe's VQA training steps")
    parser.add_argument("--pretrain-steps", type=int, help="override the recipe's vision pre-training steps")
    parser.add_argument("--continue-steps", type=int, help="train the saved model(s) this many more steps")
    parser.add_argument("--continue-lr", type=float, help="peak learning rate of the continued phase")
    parser.add_argument("--verify-in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = list(RECIPES) if args.model == "all" else [args.model]

    if args.verify_in_process:
        for name in names:
            verify(RECIPES[name], args.threads)
        return
    if args.continue_steps:
        if len(names) > 1 and not args.sequential:
            passthrough = ["--no-verify", f"--threads={args.threads}", f"--continue-steps={args.continue_steps}"]
            passthrough += [f"--continue-lr={args.continue_lr}"] if args.continue_lr else []
            _in_parallel(names, passthrough, "continued training")
        else:
            for name in names:
                continue_training(RECIPES[name], args.continue_steps, args.threads, args.continue_lr)
    elif not args.verify:
        given = {"steps": args.steps, "pretrain_steps": args.pretrain_steps}
        overrides = {k: v for k, v in given.items() if v is not None}
        if len(names) > 1 and not args.sequential:
            passthrough = ["--no-verify", f"--threads={args.threads}"]
            passthrough += [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
            _in_parallel(names, passthrough, "training")
        else:
            for name in names:
                train(dataclasses.replace(RECIPES[name], **overrides), args.threads)
    if args.verify or not args.no_verify:
        for name in names:  # a fresh process: nothing from training survives but the saved folder
            subprocess.run(
                _self_command("--model", name, "--verify-in-process", f"--threads={args.threads}"), check=True
            )
    print(write_markdown())


if __name__ == "__main__":
    main()
