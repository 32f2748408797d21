"""Reference oracles: slow, obviously-correct versions of what the runtime computes cleverly, for tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import find_decoder_stack, find_final_norm
from ..calibration.capture import CapturedSample, layer_forward

# the building blocks the block-wise pass uses too; the oracle differs in running one full graph per sample
from ..calibration.importance import (
    AnswerLoss,
    _answer_positions,
    _draws_from_logits,
    _grab_points,
    _NoParamGrad,
    _OutputGrabber,
    _reduce_of,
    _softcapped,
    logit_softcap,
)

__all__ = ["reference_importance"]


def reference_importance(
    model: nn.Module, captured: list[CapturedSample], targets: dict[str, nn.Module], **options: Any
) -> dict[str, list[torch.Tensor]]:
    """The same raw importance from full-graph backwards through the whole decoder, one per draw (for testing the
    block-wise pass). ``options``: ``kind`` (default ``"fisher"``) and ``loss_spec`` (default gold labels)."""
    stack = find_decoder_stack(model)
    kind, spec = options.get("kind", "fisher"), options.get("loss_spec") or AnswerLoss()
    reduce = _reduce_of(kind)
    norm, head = find_final_norm(model, stack), model.get_output_embeddings()
    softcap = logit_softcap(model)
    raw: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    points, source = _grab_points(model, targets)
    grabber = _OutputGrabber(points)
    try:
        with _NoParamGrad(model), torch.enable_grad():
            for s in captured:
                h = s.hidden.detach().requires_grad_(True)
                for i, layer in enumerate(stack.layers):
                    h = s.after_layer(i, layer_forward(layer, h, s.kwargs_for(i)))
                pos, gold = _answer_positions(s.labels, spec.tokens == "first")
                logits = _softcapped(head(norm(h))[0, pos], softcap).float()
                scale = torch.full((len(pos),), 1.0 / max(len(pos), 1))
                draws = _draws_from_logits(logits, gold, scale, spec)
                sums = {name: 0 for name in points}
                for d, (labels, weights) in enumerate(draws):
                    loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum()
                    loss.backward(retain_graph=d + 1 < len(draws))
                    for name in points:
                        sums[name] = sums[name] + reduce(grabber.outputs[name].grad).reshape(-1).cpu()
                        grabber.outputs[name].grad = None
                for name in targets:
                    raw[name].append(sums[source[name]])
                grabber.outputs.clear()
    finally:
        grabber.remove()
    return raw
