"""Sample batches: the plan, rank assignment, stacked call kwargs, and batched gradient pass == one by one."""

from __future__ import annotations

import pytest
import torch
from _helpers import FAMILIES, auto_class
from transformers import AutoProcessor

from tlq_hf.arch import find_decoder_stack, select_quant_targets
from tlq_hf.calibration.batching import BATCH_ELEMENTS, assign_batches, layer_units, plan_batches, stack_kwargs
from tlq_hf.calibration.capture import capture_layer_inputs
from tlq_hf.calibration.importance import AnswerLoss, gradient_importance
from tlq_hf.data import build_calibration_set
from tlq_hf.testing.tiny_models import sample_images


def test_plan_groups_equal_lengths_in_order_and_bounds_each_batch():
    lengths = [5, 7, 5, 5, 7, 9, 5]
    assert plan_batches(lengths, hidden_size=8, max_batch=3) == [[0, 2, 3], [6], [1, 4], [5]]
    # the element budget: a batch holds at most BATCH_ELEMENTS hidden-state elements (a long sample runs alone)
    long = BATCH_ELEMENTS // 8 // 2
    assert plan_batches([long] * 5, hidden_size=8) == [[0, 1], [2, 3], [4]]
    assert plan_batches([4 * long] * 2, hidden_size=8) == [[0], [1]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_take_whole_batches_and_every_sample_once(world):
    plan = plan_batches([3, 4, 3, 3, 4, 5, 3, 4, 6, 6], hidden_size=8, max_batch=2)
    shards = [assign_batches(plan, world, r) for r in range(world)]
    seen = sorted(i for shard, _ in shards for i in shard)
    assert seen == list(range(10))
    for shard, positions in shards:
        assert shard, "every rank gets samples"
        assert [j for p in positions for j in p] == list(range(len(shard)))
        for p in positions:  # each local batch is one batch of the global plan
            assert [shard[j] for j in p] in plan or world > len(plan)
    loads = [len(shard) for shard, _ in shards]
    assert max(loads) - min(loads) <= 2  # balanced to within one batch


def test_fewer_batches_than_ranks_are_split_and_too_few_samples_refused():
    shards = [assign_batches([[0, 1, 2, 3]], 2, r)[0] for r in range(2)]
    assert shards == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot be shared by 3 processes"):
        assign_batches([[0, 1]], 3, 0)


def test_stack_kwargs_concatenates_on_the_batch_axis_and_refuses_what_differs():
    a = {"pos": (torch.zeros(1, 4, 2), torch.ones(1, 4, 2)), "ids": torch.arange(4)[None], "mask": None, "c": True}
    b = {"pos": (torch.ones(1, 4, 2), torch.zeros(1, 4, 2)), "ids": torch.arange(4)[None] + 1, "mask": None, "c": True}
    out = stack_kwargs([a, b])
    assert out["pos"][0].shape == (2, 4, 2) and torch.equal(out["pos"][0][1], torch.ones(4, 2))
    assert torch.equal(out["ids"], torch.stack([torch.arange(4), torch.arange(4) + 1]))
    assert out["mask"] is None and out["c"] is True
    # M-RoPE position ids [3, 1, T]: the batch axis is the first one of size 1
    mrope = stack_kwargs([{"p": torch.zeros(3, 1, 4)}, {"p": torch.ones(3, 1, 4)}])["p"]
    assert mrope.shape == (3, 2, 4) and torch.equal(mrope[:, 1], torch.ones(3, 4))
    # no batch axis: shared when equal, else the samples cannot run together
    assert torch.equal(stack_kwargs([{"c": torch.arange(4)}, {"c": torch.arange(4)}])["c"], torch.arange(4))
    assert stack_kwargs([{"c": torch.arange(4)}, {"c": torch.arange(4) + 1}]) is None
    assert stack_kwargs([{"c": True}, {"c": False}]) is None
    assert stack_kwargs([{"c": torch.zeros(1, 4)}, {"c": torch.zeros(1, 5)}]) is None
    assert stack_kwargs([{"c": 1}, {"d": 1}]) is None
    units = layer_units([{"c": True}, {"c": False}, {"c": True}], [4, 4, 4], [[0, 1, 2]])
    assert [u.samples for u in units] == [[0], [1], [2]]  # unstackable: one call per sample, same batch order
    assert [u.samples for u in layer_units([{}, {}, {}], [4, 5, 4], [[0, 1, 2]])] == [[0, 2], [1]]


def _equal_length_rows(n: int) -> list[dict]:
    """``n`` rows of one length (different photos, one question and answer) and one longer row."""
    rows = [{"image": img, "question": "what is in the picture", "answer": "a photo"} for img in sample_images(n)]
    return rows + [{"image": sample_images(1)[0], "question": "describe the image in one word", "answer": "a photo"}]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_gradient_pass_equals_one_sample_at_a_time(tiny_vlm_dirs, family):
    path = tiny_vlm_dirs[family]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    rows = _equal_length_rows(4)
    samples = build_calibration_set(rows, AutoProcessor.from_pretrained(path), len(rows))
    stack = find_decoder_stack(model)
    captured = capture_layer_inputs(model, stack, samples)
    targets = select_quant_targets(model, None)
    batches = plan_batches([s.num_tokens for s in samples], model.get_input_embeddings().embedding_dim)
    assert max(len(b) for b in batches) == 4
    lengths = [c.hidden.shape[1] for c in captured]
    units = layer_units([c.kwargs for c in captured], lengths, batches)
    assert max(len(u.samples) for u in units) == 4, "the four equal-length samples run as one call"
    spec = AnswerLoss("predictive", topk=2) if family == "llava" else None  # draws: grads are sample-major
    one = gradient_importance(model, stack, captured, targets, keep_boundaries=True, loss_spec=spec)
    many = gradient_importance(model, stack, captured, targets, keep_boundaries=True, loss_spec=spec, batches=batches)
    assert abs(one.loss - many.loss) <= 1e-5 * abs(one.loss)
    for name in targets:
        assert len(many.raw[name]) == len(captured)
        assert all(_close(b, a) for a, b in zip(one.raw[name], many.raw[name])), name
    for a_layer, b_layer in zip(one.layer_raw, many.layer_raw):
        assert all(_close(b, a) for a, b in zip(a_layer, b_layer))
    for a_store, b_store in zip(one.boundaries, many.boundaries):
        assert all(_close(b, a) for a, b in zip(a_store, b_store))
    # samples are not mixed up inside a batch: different photos give different importance
    first = next(iter(targets))
    assert not torch.allclose(many.raw[first][0], many.raw[first][1])
