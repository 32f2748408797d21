"""Gradient token importance: block-wise equals full-graph, weights are zero-free, selection and modality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import FAMILIES, auto_class
from transformers import AutoProcessor

from tlq_hf import TLQConfig
from tlq_hf.arch import find_decoder_stack, find_final_norm, select_quant_targets
from tlq_hf.calibration.capture import capture_layer_inputs, layer_forward
from tlq_hf.calibration.importance import (
    AnswerLoss,
    Tempering,
    gradient_importance,
    modality_balance,
    select_tokens,
    temper,
    temper_all,
)
from tlq_hf.data import build_calibration_set
from tlq_hf.nn import TLQLinear
from tlq_hf.testing.oracles import reference_importance
from tlq_hf.testing.tiny_models import MOE_FAMILIES, sample_rows


def _setup(tiny_vlm_dirs, family, n=3):
    path = tiny_vlm_dirs[family]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    samples = build_calibration_set(sample_rows(n), AutoProcessor.from_pretrained(path), n)
    stack = find_decoder_stack(model)
    return model, stack, capture_layer_inputs(model, stack, samples), select_quant_targets(model, None)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3"])
@pytest.mark.parametrize("kind", ["fisher", "l1"])
def test_blockwise_importance_equals_full_graph_autograd(tiny_vlm_dirs, family, kind):
    model, stack, captured, targets = _setup(tiny_vlm_dirs, family)
    block = gradient_importance(model, stack, captured, targets, kind=kind)
    full = reference_importance(model, captured, targets, kind=kind)
    assert set(block.raw) == set(full) == set(targets)
    for name in targets:
        for b, f in zip(block.raw[name], full[name]):
            assert b.shape == f.shape
            assert torch.allclose(b, f, rtol=1e-5, atol=1e-5 * float(f.abs().max())), name
    # the answer loss only reaches tokens before the last answer token: the gradient has real structure
    some = block.raw[next(iter(targets))][0]
    assert (some > 0).any() and (some == 0).any()
    assert not any(p.requires_grad is False for p in model.parameters())  # parameters left as they were


def test_capture_keeps_masks_and_first_layer_input(tiny_vlm_dirs):
    model, stack, captured, _ = _setup(tiny_vlm_dirs, "qwen2_5_vl", n=2)
    for c in captured:
        assert c.hidden.shape[1] == c.labels.shape[1] == c.vision_mask.shape[0]
        assert c.vision_mask.sum() > 0 and c.answer_mask.sum() > 0
        assert not (c.vision_mask & c.answer_mask).any()
        assert "position_embeddings" in c.kwargs or "position_ids" in c.kwargs


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_captured_layer_calls_reproduce_the_model(tiny_vlm_dirs, family):
    """Every decoder layer replayed with its own captured kwargs, then the final norm and head, gives the model's
    own logits; the gradient pass's answer loss is the model's loss. Gemma 3's sliding-window and global layers
    are called with different masks and RoPE tables: layer 0's kwargs alone would not do."""
    path = tiny_vlm_dirs[family]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    samples = build_calibration_set(sample_rows(2), AutoProcessor.from_pretrained(path), 2)
    stack = find_decoder_stack(model)
    captured = capture_layer_inputs(model, stack, samples)
    norm, head = find_final_norm(model, stack), model.get_output_embeddings()
    losses = []
    with torch.no_grad():
        for sample, c in zip(samples, captured):
            h = c.hidden
            for i, layer in enumerate(stack.layers):
                h = c.after_layer(i, layer_forward(layer, h, c.kwargs_for(i)))
            out = model(**sample.inputs, labels=sample.labels)
            assert torch.allclose(head(norm(h)), out.logits, rtol=1e-5, atol=1e-5)
            losses.append(float(out.loss))
    distinct = {id(k) for k in captured[0].layer_kwargs}
    assert len(distinct) == len(set(getattr(model.config.get_text_config(), "layer_types", None) or [None]))
    grad = gradient_importance(model, stack, captured, select_quant_targets(model, None))
    assert grad.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


class _ToyLayer(torch.nn.Module):
    def __init__(self, width: int, tuple_output: bool) -> None:
        super().__init__()
        self.proj, self.tuple_output = torch.nn.Linear(width, width), tuple_output

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        out = hidden_states + torch.tanh(self.proj(hidden_states)) * attention_mask + position_embeddings
        return (out, None) if self.tuple_output else out


class _ToyDecoder(torch.nn.Module):
    """A text model whose layers alternate two masks and that touches the hidden states between layers; layers
    return tuples that the loop indexes (transformers 4.x style) or bare tensors (5.x style)."""

    def __init__(self, tuple_output: bool, layers: int = 5, width: int = 8) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(image_token_id=1)
        self.embed = torch.nn.Embedding(16, width)
        self.layers = torch.nn.ModuleList(_ToyLayer(width, tuple_output) for _ in range(layers))
        self.tuple_output = tuple_output

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        masks = {"a": torch.ones(1, h.shape[1], 1), "b": torch.full((1, h.shape[1], 1), 0.5)}
        rope = torch.linspace(0, 1, h.shape[-1])
        for i, layer in enumerate(self.layers):
            out = layer(h, attention_mask=masks["ab"[i % 2]], position_embeddings=rope)
            h = out[0] if self.tuple_output else out
            h = h * 1.0 + h[:, :1] * 0.0  # a between-layer step that needs the [1, T, H] hidden states
        return h


@pytest.mark.parametrize("tuple_output", [False, True])
def test_capture_handles_tuple_and_tensor_layer_outputs(tuple_output):
    from tlq_hf.arch import DecoderStack
    from tlq_hf.data import CalibrationSample

    torch.manual_seed(0)
    model = _ToyDecoder(tuple_output)
    ids = torch.tensor([[3, 1, 1, 4, 5, 6]])
    sample = CalibrationSample(inputs={"input_ids": ids}, labels=ids.clone())
    (c,) = capture_layer_inputs(model, DecoderStack("layers", model.layers), [sample])
    assert len({id(k) for k in c.layer_kwargs}) == 2 and c.kwargs_for(2) is c.kwargs_for(0)
    assert torch.equal(c.vision_mask, ids[0] == 1)
    h = c.hidden
    for i, layer in enumerate(model.layers):
        h = layer_forward(layer, h, c.kwargs_for(i))
    with torch.no_grad():
        assert torch.allclose(h, model(ids))
    assert "forward" not in model.layers[0].__dict__  # the layers' own forwards are back


def test_gemma3_layers_see_bidirectional_image_blocks_and_their_own_window(tiny_vlm_dirs):
    """Gemma 3 (processor ``token_type_ids``): image tokens attend to later image tokens in every layer; the
    sliding-window layer cannot see past its window, the global layer can."""
    path = tiny_vlm_dirs["gemma3"]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    (sample,) = build_calibration_set(sample_rows(1), AutoProcessor.from_pretrained(path), 1)
    assert "token_type_ids" in sample.inputs
    stack = find_decoder_stack(model)
    (c,) = capture_layer_inputs(model, stack, [sample])
    image = c.vision_mask.nonzero().flatten()
    first, last = int(image[0]), int(image[-1])
    window = model.config.get_text_config().sliding_window
    for i, kind in enumerate(model.config.get_text_config().layer_types):
        mask = c.kwargs_for(i)["attention_mask"][0, 0]
        allowed = mask if mask.dtype == torch.bool else mask == 0
        assert allowed[first, last], (i, kind)  # bidirectional within the image
        end = mask.shape[-1] - 1
        assert end >= window  # the last token is further than the window from the first
        assert bool(allowed[end, 0]) == (kind == "full_attention"), (i, kind)


def test_tempered_importance_is_zero_free_and_finite():
    raw = torch.tensor([0.0, 0.0, 1e-12, 3.0, 1e6, float("inf")]).nan_to_num(posinf=1e30)
    a = temper(raw, Tempering(gamma=0.5, lo=0.05, hi=20.0))
    assert torch.isfinite(a).all() and (a >= 0.05).all() and (a <= 20).all()
    assert torch.equal(temper(torch.zeros(4), Tempering()), torch.ones(4))
    mixed = temper(raw, Tempering(gamma=1.0, lo=0.05, hi=20.0, mix=0.5))
    assert (mixed >= 0.5).all()


def test_tempering_all_samples_at_once_equals_one_at_a_time():
    gen = torch.Generator().manual_seed(0)
    raw = [torch.rand(n, generator=gen) ** 4 * 10 for n in (3, 7, 1, 5)]
    raw += [torch.zeros(4), torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([-1.0, 2.0, 0.0])]
    t = Tempering(gamma=0.7, lo=0.05, hi=20.0, mix=0.1)
    together = temper_all(raw, t)
    for r, a in zip(raw, together):
        a_mean = r.float().clamp_min(0).mean()
        if a_mean > 0 and torch.isfinite(a_mean):
            expected = (1 - t.mix) * (r.float().clamp_min(0) / a_mean).pow(t.gamma).clamp(t.lo, t.hi) + t.mix
        else:  # no usable gradient: uniform
            expected = torch.ones_like(r)
        assert a.shape == r.shape and torch.allclose(a, expected, rtol=1e-6), r
    assert temper_all([], t) == []


def test_select_tokens_keeps_the_most_important_fraction():
    w = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 2.0, 3.0, 0.5])]
    kept = select_tokens(w, 0.5)  # ceil(3.5) = 4 tokens: 5, 4, 3, 3
    flat = torch.cat(kept)
    assert int((flat > 0).sum()) == 4
    assert torch.equal(kept[0], torch.tensor([5.0, 0.0, 3.0])) and torch.equal(
        kept[1], torch.tensor([4.0, 0.0, 3.0, 0.0])
    )
    assert select_tokens(w, 1.0) is w


def test_modality_balance_assigns_modality_means():
    raw = [torch.tensor([1.0, 3.0, 10.0]), torch.tensor([2.0, 20.0])]
    vis = [torch.tensor([True, True, False]), torch.tensor([True, False])]
    out = modality_balance(raw, vis)
    assert torch.equal(out[0], torch.tensor([2.0, 2.0, 15.0])) and torch.equal(out[1], torch.tensor([2.0, 15.0]))


def test_exposed_inputs_differ_from_full_precision_after_layer_zero(tiny_vlm_dirs):
    path = tiny_vlm_dirs["llava_onevision"]
    errors = {}
    for exposed in (True, False):
        cfg = TLQConfig(bits=3, method="gptq", exposed=exposed, dataset=sample_rows(4), num_samples=4)
        model = auto_class().from_pretrained(path, quantization_config=cfg)
        errors[exposed] = [r.error_before for r in model.tlq_report.layers]
    assert errors[True][0] == 0 and errors[False][0] == 0  # layer 0 always sees the true input
    assert errors[True][1] > 1e-6  # quantized layer 0 changed what layer 1 sees
    assert errors[False][1] == 0


def test_chunked_head_loss_and_gradient_equal_autograd():
    from torch import nn

    from tlq_hf.calibration.importance import _head_loss_and_grad

    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=gen))
        head.bias.copy_(torch.randn(50, generator=gen))
    x = torch.randn(5, 16, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 7, 13, 49, 21])
    loss_ref = torch.nn.functional.cross_entropy(head(x), targets)
    loss_ref.backward()
    weights = torch.full((5,), 1 / 5)
    loss, grad = _head_loss_and_grad(x.detach(), head, targets, weights, torch.float32, chunk=7)
    assert loss.shape == (5,) and torch.allclose(loss.mean(), loss_ref.detach(), rtol=1e-6)
    assert torch.allclose(grad, x.grad, rtol=1e-5, atol=1e-7)
    # rows of two samples with their own means: the gradient of the sum of the two sample losses
    x.grad = None
    split = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])
    loss_ref = F.cross_entropy(head(x[:2]), targets[:2]) + F.cross_entropy(head(x[2:]), targets[2:])
    loss_ref.backward()
    loss, grad = _head_loss_and_grad(x.detach(), head, targets, split, torch.float32, chunk=7)
    assert torch.allclose(loss @ split, loss_ref.detach(), rtol=1e-6)
    assert torch.allclose(grad, x.grad, rtol=1e-5, atol=1e-7)
    # soft-capped logits (Gemma 2, Gemma 3 where configured): cap * tanh(logits / cap)
    x.grad = None
    cap = 3.0
    loss_ref = F.cross_entropy(torch.tanh(head(x) / cap) * cap, targets)
    loss_ref.backward()
    loss, grad = _head_loss_and_grad(x.detach(), head, targets, weights, torch.float32, chunk=7, softcap=cap)
    assert torch.allclose(loss.mean(), loss_ref.detach(), rtol=1e-6)
    assert torch.allclose(grad, x.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# Which gradient: predictive labels, first answer token, layer scope
# --------------------------------------------------------------------------- #


class _WrappedHead(torch.nn.Module):
    """A head that is not a plain ``nn.Linear``: the gradient pass takes its plain-autograd path."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
@pytest.mark.parametrize(
    "spec", [AnswerLoss("predictive", 3, "all"), AnswerLoss("gold", 4, "first"), AnswerLoss("predictive", 2, "first")]
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_blockwise_answer_loss_variants_equal_full_graph(tiny_vlm_dirs, family, spec, wrapped):
    model, stack, captured, targets = _setup(tiny_vlm_dirs, family, n=2)
    if wrapped:
        model.lm_head = _WrappedHead(model.lm_head)
    block = gradient_importance(model, stack, captured, targets, loss_spec=spec)
    full = reference_importance(model, captured, targets, loss_spec=spec)
    gold = gradient_importance(model, stack, captured, targets)
    differs = False
    for name in targets:
        for b, f, g in zip(block.raw[name], full[name], gold.raw[name]):
            assert torch.allclose(b, f, rtol=1e-4, atol=1e-5 * float(f.abs().max())), name
            differs |= not torch.allclose(b, g, rtol=1e-3)
    assert differs  # the variant is a different weighting than the gold-label, all-token default
    assert block.loss == pytest.approx(gold.loss, rel=1e-5) if spec.tokens == "all" else block.loss > 0
    assert len(block.layer_raw) == len(stack.layers) and all(len(x) == len(captured) for x in block.layer_raw)


def test_first_answer_positions_pick_the_start_of_each_answer():
    from tlq_hf.calibration.importance import _answer_positions

    labels = torch.tensor([[-100, -100, 5, 6, 7, -100, -100, 8, 9]])
    pos, tokens = _answer_positions(labels)
    assert pos.tolist() == [1, 2, 3, 6, 7] and tokens.tolist() == [5, 6, 7, 8, 9]
    pos, tokens = _answer_positions(labels, first=True)
    assert pos.tolist() == [1, 6] and tokens.tolist() == [5, 8]


def test_topk_labels_are_the_head_distribution_top_k_across_chunks():
    from torch import nn

    from tlq_hf.calibration.importance import _topk_labels

    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(8, 23)
    with torch.no_grad():
        head.weight.copy_(torch.randn(23, 8, generator=gen) * 3)
    x = torch.randn(6, 8, generator=gen)
    gold = torch.tensor([0, 5, 22, 11, 7, 3])
    labels, q, gold_loss = _topk_labels(x, head, gold, 4, torch.float32, chunk=5)
    logits = head(x).detach()
    ref_v, ref_i = torch.topk(logits, 4, dim=-1)
    assert torch.equal(labels, ref_i)
    assert torch.allclose(q, torch.softmax(ref_v, -1), atol=1e-6)
    assert torch.allclose(gold_loss, F.cross_entropy(logits, gold, reduction="none"), atol=1e-5)


def test_layer_scope_weights_every_module_by_the_layer_output(tiny_vlm_dirs):
    from tlq_hf.calibration.distributed import Comm
    from tlq_hf.calibration.importance import TokenWeighting

    model, stack, captured, targets = _setup(tiny_vlm_dirs, "llava", n=2)
    grad = gradient_importance(model, stack, captured, targets)
    masks, samples = [c.vision_mask for c in captured], list(range(len(captured)))
    by_module = TokenWeighting(grad, "fisher", Tempering(), 1.0, masks, samples, Comm())
    by_layer = TokenWeighting(grad, "fisher", Tempering(), 1.0, masks, samples, Comm(), "layer", stack.layer_index)
    # (not down_proj: its output gradient is the layer output's, through the residual sum)
    name = stack.layer_prefix(1) + ".self_attn.q_proj"
    for a, b in zip(by_layer.for_modules([name]), by_layer.for_layer(1)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(by_module.for_modules([name]), by_layer.for_modules([name])))
    with pytest.raises(ValueError, match="not inside the decoder layers"):
        stack.layer_index("lm_head")


@pytest.mark.parametrize(
    "field, value",
    [
        ("importance_labels", "sampled"),
        ("importance_topk", 0),
        ("importance_topk", True),
        ("answer_tokens", "last"),
        ("importance_scope", "model"),
    ],
)
def test_answer_loss_fields_are_validated_and_serialised(field, value):
    with pytest.raises(ValueError, match=field):
        TLQConfig(**{field: value})
    config = TLQConfig(
        importance_labels="predictive", importance_topk=3, answer_tokens="first", importance_scope="layer"
    )
    again = TLQConfig.from_dict(config.to_dict())
    assert (again.importance_labels, again.importance_topk, again.answer_tokens, again.importance_scope) == (
        "predictive",
        3,
        "first",
        "layer",
    )


def test_answer_loss_settings_reach_the_calibration(tiny_vlm_dirs):
    """Each setting changes the quantized weights (so it is wired through from TLQConfig), and the model stays
    finite."""
    rows = sample_rows(4)

    def codes(**settings):
        cfg = TLQConfig(bits=3, group_size=64, dataset=rows, num_samples=4, **settings)
        model = auto_class().from_pretrained(tiny_vlm_dirs["llava"], quantization_config=cfg, dtype=torch.float32)
        stack = find_decoder_stack(model).layers
        return torch.cat([m.codes().flatten().float() for m in stack.modules() if isinstance(m, TLQLinear)])

    base = codes()
    for settings in (
        {"importance_labels": "predictive", "importance_topk": 2},
        {"answer_tokens": "first"},
        {"importance_scope": "layer"},
    ):
        assert not torch.equal(codes(**settings), base), settings


@pytest.mark.skipif("qwen3_vl_moe" not in MOE_FAMILIES, reason="Qwen3-VL needs transformers 5")
def test_deepstack_features_added_between_layers_are_captured_at_the_image_tokens(tiny_vlm_dirs):
    """Qwen3-VL adds intermediate vision features to the image tokens after the first decoder layers (deepstack):
    capture finds them as additions after layer 0, at exactly the image tokens; replaying the layers without them
    would give other logits."""
    path = tiny_vlm_dirs["qwen3_vl_moe"]
    model, stack, captured, _ = _setup(tiny_vlm_dirs, "qwen3_vl_moe", n=2)
    norm, head = find_final_norm(model, stack), model.get_output_embeddings()
    samples = build_calibration_set(sample_rows(2), AutoProcessor.from_pretrained(path), 2)
    for c, sample in zip(captured, samples):
        assert set(c.injections) == {0}
        assert torch.equal(c.injections[0].rows, c.vision_mask.nonzero().flatten())
        with torch.no_grad():
            h = c.hidden
            for i, layer in enumerate(stack.layers):
                h = layer_forward(layer, h, c.kwargs_for(i))
            assert not torch.allclose(head(norm(h)), model(**sample.inputs).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif("qwen3_vl_moe" not in MOE_FAMILIES, reason="Qwen3-VL needs transformers 5")
def test_a_change_between_layers_that_depends_on_the_hidden_states_is_refused(tiny_vlm_dirs, monkeypatch):
    model = auto_class().from_pretrained(tiny_vlm_dirs["qwen3_vl_moe"], dtype=torch.float32)
    text = type(model.model.language_model)
    monkeypatch.setattr(text, "_deepstack_process", lambda self, hidden, mask, embeds: hidden * 1.5)
    samples = build_calibration_set(sample_rows(1), AutoProcessor.from_pretrained(tiny_vlm_dirs["qwen3_vl_moe"]), 1)
    with pytest.raises(RuntimeError, match="between decoder layers 0 and 1 .* depends on them"):
        capture_layer_inputs(model, find_decoder_stack(model), samples)
