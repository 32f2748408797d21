"""Gradient token importance, computed block-wise.

The loss is the answer-token cross-entropy of the full-precision model. A no-grad forward stores the
boundary activations ``X[0..L]`` (on the offload device); the head (final norm + ``lm_head``, soft-capped
where the model caps its logits: :func:`logit_softcap`) gives
``g[L] = dLoss/dX[L]``; then, from the last layer down, one layer at a time is re-run with grad from
``X[l]`` and back-propagated with ``g[l+1]``, so only one layer's graph is ever alive. Hooks keep the
gradient at every target linear's output: token ``t``'s raw importance for module ``m`` is
``sum_j g[t, j]^2`` (``"fisher"``, a diagonal-Fisher estimate of how much an output error at ``t`` raises
the loss) or ``sum_j |g[t, j]|`` (``"l1"``).

Which gradient: :class:`AnswerLoss` says which answer tokens carry the loss (every one, or the first of
each answer) and at which labels it is taken: the gold answers (the empirical Fisher) or the full-precision
model's own predictive distribution, as the expectation over its top-k tokens at each answer position
(one backward per label, the squared gradients weighted by the renormalised probabilities). A confident,
well-trained model has near-zero gold-label gradients on the answers it gets right; the predictive Fisher
does not collapse there.

Raw importance is then normalised per sample and tempered, ``a <- clip((a / mean a)^gamma, lo, hi)``,
optionally mixed with uniform weights: raw squared gradients are so peaky that a Hessian weighted by them
is effectively estimated on a handful of tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack, find_final_norm
from ..experts import expert_owner
from .activations import ActivationStore
from .batching import layer_units
from .capture import CapturedSample, after_layer, layer_forward, to_device
from .distributed import Comm
from .importance_kinds import IMPORTANCE_KINDS
from .offload import compute_dtype_for, onloaded, row_reader

__all__ = [
    "AnswerLoss",
    "Tempering",
    "GradientPass",
    "gradient_importance",
    "logit_softcap",
    "temper",
    "temper_all",
    "modality_balance",
    "select_tokens",
    "TokenWeighting",
]

logger = logging.getLogger(__name__)


def _reduce_of(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient reduction of importance ``kind``; a kind without one needs no gradient pass."""
    reduce = IMPORTANCE_KINDS[kind].reduce
    if reduce is None:
        raise ValueError(f"importance {kind!r} takes no gradient: there is nothing to compute block-wise")
    return reduce


@dataclass(frozen=True)
class AnswerLoss:
    """Which answer tokens carry the loss (``tokens``: ``"all"`` or ``"first"`` of each answer) and at which
    labels its gradient is taken (``labels``: ``"gold"``, or ``"predictive"``: the model's ``topk`` most
    likely tokens, each a separate backward whose squared gradient is weighted by its renormalised
    probability)."""

    labels: str = "gold"
    topk: int = 4
    tokens: str = "all"

    @property
    def draws(self) -> int:
        """Backward passes per sample."""
        return self.topk if self.labels == "predictive" else 1


@dataclass(frozen=True)
class Tempering:
    """``a <- (1 - mix) * clip((a / mean a)^gamma, lo, hi) + mix``, per sample."""

    gamma: float = 0.5
    lo: float = 0.05
    hi: float = 20.0
    mix: float = 0.0


@dataclass
class GradientPass:
    """What the block-wise pass returns (for this rank's samples)."""

    raw: dict[str, list[torch.Tensor]]  # module name -> per-sample raw importance [T]
    layer_raw: list[list[torch.Tensor]]  # per layer, per sample raw importance [T] at the layer's output
    loss: float  # mean answer loss over all samples (all ranks)
    seconds: float = 0.0
    # ``keep_boundaries``: the full-precision layer inputs/outputs ``X[0..L]`` (this rank's samples), which
    # the layer loop reads as its full-precision targets instead of recomputing them
    boundaries: list[ActivationStore] | None = None


def logit_softcap(model: nn.Module) -> float | None:
    """The cap ``c`` of a model whose logits are ``c * tanh(lm_head(h) / c)`` (Gemma 2's and, where configured,
    Gemma 3's ``final_logit_softcapping``), else ``None``: the head the gradient pass stands in for."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if get_text is not None else config
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _head_chunks(
    x: torch.Tensor, head: nn.Linear, compute_dtype: torch.dtype, chunk: int, softcap: float | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(lo, logits, weight)`` per chunk of ``chunk`` vocabulary rows: the float32 logits ``head(x)[:, lo:lo+c]``
    (soft-capped where the model caps them) and the chunk's weight rows in ``compute_dtype``, each read from where
    the head lives (:func:`row_reader`: slice by slice from disk for an offloaded head)."""
    rows = row_reader(head, "weight")
    bias = None if head.bias is None else row_reader(head, "bias")
    for lo in range(0, head.weight.shape[0], chunk):
        weight = rows(lo, lo + chunk).to(x.device, compute_dtype)
        logits = x @ weight.T
        if bias is not None:
            logits = logits + bias(lo, lo + chunk).to(x.device, compute_dtype)
        yield lo, _softcapped(logits.float(), softcap), weight


def _head_loss_and_grad(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    weights: torch.Tensor,
    compute_dtype: torch.dtype,
    chunk: int = 8192,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``head(hidden [N, H])`` (soft-capped to ``softcap * tanh(. / softcap)`` if
    given) against ``targets [N]``, and the gradient of ``sum_r weights[r] * loss[r]`` with respect to ``hidden``.

    The vocabulary is processed in chunks of ``chunk`` rows of the head's weight, each read from where the
    weight lives (:func:`row_reader`: slice by slice from disk for an offloaded head) and cast to
    ``compute_dtype`` on its own, so neither the whole head nor a float32 copy of it is ever in memory (two
    passes: log-sum-exp, then the softmax gradient).
    """
    x = hidden.to(compute_dtype)
    w = weights.to(x.device, torch.float32)
    lse = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
    target_logit = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for lo, logits, _ in _head_chunks(x, head, compute_dtype, chunk, softcap):
        lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        inside = (targets >= lo) & (targets < lo + logits.shape[1])
        target_logit[inside] = logits[inside, targets[inside] - lo]
    grad = torch.zeros_like(x, dtype=torch.float32)
    for lo, logits, weight in _head_chunks(x, head, compute_dtype, chunk, softcap):
        d = torch.exp(logits - lse[:, None]) * w[:, None]
        inside = (targets >= lo) & (targets < lo + logits.shape[1])
        d[inside, targets[inside] - lo] -= w[inside]
        if softcap is not None:  # d tanh(l / c) * c / dl = 1 - tanh^2 = 1 - (capped / c)^2
            d *= 1 - (logits / softcap).pow(2)
        grad += d @ weight.float()
    return lse - target_logit, grad


def _answer_positions(labels: torch.Tensor, first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``p`` whose output predicts an answer token, and those tokens (``labels[p + 1]``); with
    ``first``, only the position predicting the first token of each answer."""
    nxt = labels[0, 1:]
    answer = nxt != -100
    if first:
        starts = answer.clone()
        starts[1:] &= ~answer[:-1]
        answer = starts
    pos = answer.nonzero().flatten()
    return pos, nxt[pos]


def _topk_labels(
    hidden: torch.Tensor,
    head: nn.Linear,
    gold: torch.Tensor,
    k: int,
    compute_dtype: torch.dtype,
    chunk: int = 8192,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of ``head(hidden [N, H])`` per row, their probabilities renormalised over
    the ``k``, and the gold cross-entropy per row; one chunked pass over the vocabulary (as
    :func:`_head_loss_and_grad`, the head is never whole in memory)."""
    x = hidden.to(compute_dtype)
    n = x.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    gold_logit = torch.zeros(n, dtype=torch.float32, device=x.device)
    top_v = torch.full((n, 0), float("-inf"), dtype=torch.float32, device=x.device)
    top_i = torch.zeros((n, 0), dtype=torch.long, device=x.device)
    for lo, logits, _ in _head_chunks(x, head, compute_dtype, chunk, softcap):
        lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        inside = (gold >= lo) & (gold < lo + logits.shape[1])
        gold_logit[inside] = logits[inside, gold[inside] - lo]
        v, i = torch.topk(logits, min(k, logits.shape[1]), dim=-1)
        top_v, order = torch.topk(torch.cat([top_v, v], -1), min(k, top_v.shape[1] + v.shape[1]), dim=-1)
        top_i = torch.gather(torch.cat([top_i, i + lo], -1), 1, order)
    probs = torch.exp(top_v - lse[:, None])
    return top_i, probs / probs.sum(-1, keepdim=True), lse - gold_logit


def _draws(
    rows: torch.Tensor,
    head: nn.Linear,
    gold: torch.Tensor,
    scale: torch.Tensor,
    spec: AnswerLoss,
    compute_dtype: torch.dtype,
    softcap: float | None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The ``(targets, row weights)`` of each backward draw, and the gold cross-entropy per row.

    Gold labels: one draw, weights ``scale`` (1 / answer length: a sample's loss is its mean). Predictive:
    one draw per top-k token, weights ``scale * sqrt(q)``, so each draw's squared gradient counts with the
    token's renormalised probability ``q``.
    """
    if spec.labels == "gold":
        return [(gold, scale)], None
    labels, q, gold_loss = _topk_labels(rows, head, gold, spec.topk, compute_dtype, softcap=softcap)
    return _weighted_draws(labels, q, scale), gold_loss


def _weighted_draws(
    labels: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One draw per column of ``labels [N, k]``: its targets and row weights ``scale * sqrt(q)``."""
    return [(labels[:, j], scale * q[:, j].sqrt()) for j in range(labels.shape[1])]


def _draws_from_logits(
    logits: torch.Tensor, gold: torch.Tensor, scale: torch.Tensor, spec: AnswerLoss
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_draws` from logits already in memory (a head that is not a plain linear layer, the reference)."""
    if spec.labels == "gold":
        return [(gold, scale)]
    top_v, top_i = torch.topk(logits.detach(), min(spec.topk, logits.shape[-1]), dim=-1)
    return _weighted_draws(top_i, torch.softmax(top_v, -1), scale)


class _OutputGrabber:
    """Forward hooks that keep each named module's output in the graph with ``retain_grad``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            output.retain_grad()
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _NoParamGrad:
    """Temporarily stop parameters from accumulating ``.grad`` (only activations need gradients)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _layer_targets(stack: DecoderStack, targets: dict[str, nn.Module], index: int) -> dict[str, nn.Module]:
    prefix = stack.layer_prefix(index) + "."
    return {n: m for n, m in targets.items() if n.startswith(prefix)}


def _grab_points(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Where each target's output gradient is read: its own output, or for an expert's linear the output of
    its experts module (a token's importance is the same whichever expert it reaches; an expert's own output
    holds only its routed rows). Returns the modules to hook and ``target -> hooked name``."""
    source = {name: expert_owner(name, model) or name for name in targets}
    points = {s: (targets[s] if s in targets else model.get_submodule(s)) for s in set(source.values())}
    return points, source


def gradient_importance(
    model: nn.Module,
    stack: DecoderStack,
    captured: list[CapturedSample],
    targets: dict[str, nn.Module],
    kind: str = "fisher",
    spill_dir: str | None = None,
    comm: Comm | None = None,
    keep_boundaries: bool = False,
    loss_spec: AnswerLoss | None = None,
    batches: list[list[int]] | None = None,
) -> GradientPass:
    """Block-wise backward of the answer loss; per-module, per-token raw importance.

    (Ten parameters: the model's parts, then options that each have a default, named at every call.)
    ``batches`` (positions in ``captured``; default: every sample alone) are run through each layer together
    where their lengths and call kwargs stack (:mod:`.batching`).

    ``loss_spec`` (default: gold labels, every answer token) picks the loss and labels; with ``k`` draws per
    sample (predictive labels) each layer's forward is run once and back-propagated ``k`` times, and a
    token's raw importance is the sum over draws.

    The boundaries ``X[0..L]`` live in :class:`ActivationStore` objects (spilled to ``spill_dir`` if given);
    each is dropped as soon as the backward has passed it, unless ``keep_boundaries`` (then they are
    returned). Each layer is onloaded once per direction.
    """
    import time

    start = time.perf_counter()
    comm = comm or Comm()
    run = _BlockwisePass(model, stack, captured, targets, _reduce_of(kind), spill_dir, loss_spec or AnswerLoss())
    run.plan(batches)
    with torch.no_grad():
        for i in tqdm(range(len(stack.layers)), desc="tlq importance fwd", unit="layer", leave=False):
            run.forward(i)
    with _NoParamGrad(model), torch.enable_grad():
        total = run.head()
        for i in tqdm(range(len(stack.layers), -1, -1), desc="tlq importance bwd", unit="layer", leave=False):
            if i < len(stack.layers):
                run.backward(i)
            if not keep_boundaries:
                run.boundaries[i].close()
    run.grads.close()
    total, count = comm.sum(total, len(captured))
    loss = total / max(count, 1)
    logger.info("tlq importance: answer loss %.4f over %d samples", loss, int(count))
    raw = {name: _complete(values, name) for name, values in run.raw.items()}
    layer_raw = [_complete(values, f"layer {i}") for i, values in enumerate(run.layer_raw)]
    kept = run.boundaries if keep_boundaries else None
    return GradientPass(raw, layer_raw, loss, time.perf_counter() - start, kept)


class _BlockwisePass:
    """One gradient pass, a layer at a time: the batch plan, the forward that stores the boundaries ``X[0..L]``,
    the head's gradient at ``X[L]``, then per layer the backward that turns the gradient at ``X[l + 1]`` into the
    one at ``X[l]`` while accumulating each module's raw importance from the gradient at its output."""

    def __init__(
        self,
        model: nn.Module,
        stack: DecoderStack,
        captured: list[CapturedSample],
        targets: dict[str, nn.Module],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        spill_dir: str | None,
        spec: AnswerLoss,
    ) -> None:
        self.model, self.stack, self.captured, self.targets = model, stack, captured, targets
        self.reduce, self.spill_dir, self.spec = reduce, spill_dir, spec
        n = len(captured)
        self.boundaries = [ActivationStore.of([s.hidden for s in captured], spill_dir, "x0")]
        self.grads = ActivationStore(spill_dir, "g")  # at the current boundary, sample-major over draws
        self.raw: dict[str, list[torch.Tensor | None]] = {name: [None] * n for name in targets}
        self.layer_raw: list[list[torch.Tensor | None]] = [[None] * n for _ in stack.layers]
        self.units: list[list] = []

    def plan(self, batches: list[list[int]] | None) -> None:
        """The samples that run through each layer together (per layer: their call kwargs must stack)."""
        lengths = [s.hidden.shape[1] for s in self.captured]
        for i in range(len(self.stack.layers)):
            self.units.append(layer_units([s.kwargs_for(i) for s in self.captured], lengths, batches))

    def forward(self, i: int) -> None:
        """``X[i + 1]`` from ``X[i]`` (no grad)."""
        layer, out = self.stack.layers[i], ActivationStore(self.spill_dir, f"x{i + 1}")
        with onloaded(layer) as on:
            for unit in self.units[i]:
                h = _gather(self.boundaries[i], unit.samples).to(on.device, on.compute_dtype)
                y = layer_forward(layer, h, to_device(unit.kwargs, on.device, on.compute_dtype))
                y = after_layer([self.captured[j] for j in unit.samples], i, y)  # e.g. deepstack features
                for j, row in zip(unit.samples, y.split(1)):
                    out.put(j, row.to(on.store_dtype))
        self.boundaries.append(out)

    def head(self) -> float:
        """The answer loss's gradient at ``X[L]`` into :attr:`grads`; returns the sum of per-sample gold losses."""
        model, stack, last = self.model, self.stack, self.boundaries[-1]
        norm, head = find_final_norm(model, stack), model.get_output_embeddings()
        softcap, total = logit_softcap(model), 0.0
        if isinstance(head, nn.Linear):  # the head is read chunk by chunk from where it lives, never onloaded whole
            with onloaded(norm) as on:
                at = _Head(norm, head, on.device, compute_dtype_for(on.device, head.weight.dtype), softcap)
                total += _chunked_head_gradients(last, self.captured, at, self.grads, self.spec)
        else:  # plain autograd through the head module
            with onloaded(norm), onloaded(head) as on:
                at = _Head(norm, head, on.device, compute_dtype_for(on.device, on.store_dtype), softcap)
                for h, s in zip(last, self.captured):
                    total += _module_head_gradients(h, s, at, self.grads, self.spec)
        return total

    def backward(self, i: int) -> None:
        """The gradient at ``X[i]`` from the one at ``X[i + 1]``, and layer ``i``'s raw importance."""
        layer = self.stack.layers[i]
        points, source = _grab_points(self.model, _layer_targets(self.stack, self.targets, i))
        grabber = _OutputGrabber(points)
        new_grads = ActivationStore(self.spill_dir, "g")
        try:
            with onloaded(layer) as on:
                for unit in self.units[i]:
                    h = _gather(self.boundaries[i], unit.samples).to(on.device, on.compute_dtype)
                    h = h.detach().requires_grad_(True)
                    out = layer_forward(layer, h, to_device(unit.kwargs, on.device, on.compute_dtype))
                    at_output, sums = self._draws_backward(unit.samples, h, out, grabber, new_grads)
                    for b, j in enumerate(unit.samples):
                        self.layer_raw[i][j] = at_output[b]
                        for name, src in source.items():
                            self.raw[name][j] = sums[src][b]
                    grabber.outputs.clear()
        finally:
            grabber.remove()
        self.grads.close()
        self.grads = new_grads

    def _draws_backward(
        self,
        samples: list[int],
        h: torch.Tensor,
        out: torch.Tensor,
        grabber: _OutputGrabber,
        new_grads: ActivationStore,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Back-propagate every draw's gradient through one unit's graph; returns the raw importance at the layer
        output and at each grabbed module output, summed over draws, and puts the input gradients in
        ``new_grads``."""
        draws, reduce = self.spec.draws, self.reduce
        sums: dict[str, torch.Tensor] = {}
        at_output = None
        for d in range(draws):
            slots = [j * draws + d for j in samples]  # grads are sample-major
            g = _gather(self.grads, slots)
            part = reduce(g).cpu()
            at_output = part if at_output is None else at_output + part
            out.backward(g.to(h.device, out.dtype), retain_graph=d + 1 < draws)
            for name, output in grabber.outputs.items():
                part = reduce(output.grad).cpu().view(len(samples), -1)  # experts see the tokens flattened
                sums[name] = part if name not in sums else sums[name] + part
                output.grad = None
            for slot, row in zip(slots, h.grad.split(1)):
                new_grads.put(slot, row.float())
            h.grad = None
        return at_output, sums


def _gather(store: ActivationStore, slots: list[int]) -> torch.Tensor:
    """Items ``slots`` of ``store`` stacked along the batch axis (one item as it is)."""
    return store[slots[0]] if len(slots) == 1 else torch.cat([store[k] for k in slots])


def _complete(values: list[torch.Tensor | None], what: str) -> list[torch.Tensor]:
    """``values`` (one per sample) when every sample has one; ``[]`` when none has (a module never called)."""
    if all(v is None for v in values):
        return []
    if any(v is None for v in values):
        raise RuntimeError(f"importance of {what} was computed for some samples only")
    return values


@dataclass(frozen=True)
class _Head:
    """The part of the model after the decoder, as the gradient pass runs it: final norm, output head (soft-capped
    logits where the model caps them), the device and compute dtype it runs in."""

    norm: nn.Module
    head: nn.Module
    device: torch.device
    compute: torch.dtype
    softcap: float | None


def _chunked_head_gradients(
    last: ActivationStore, captured: list[CapturedSample], at: _Head, grads: ActivationStore, spec: AnswerLoss
) -> float:
    """``dLoss_s / dX[L]`` of every sample and draw into ``grads`` (sample-major); returns the sum of the
    per-sample gold answer losses.

    Only positions that predict an answer token carry loss, so every sample's such rows go through the
    head together, in one chunked pass over the vocabulary per draw (each row weighted by 1 / its sample's
    answer length: the loss of a sample is its mean); then each sample's final norm is re-run with grad and
    back-propagated from its rows' gradient of each draw.
    """
    norm, head, device, compute, softcap = at.norm, at.head, at.device, at.compute, at.softcap
    first = spec.tokens == "first"
    rows, targets, weights = [], [], []
    with torch.no_grad():
        for h, s in zip(last, captured):
            pos, target = _answer_positions(s.labels.to(device), first)
            rows.append(norm(h.to(device, compute))[0, pos])
            targets.append(target)
            weights.append(torch.full((len(pos),), 1.0 / max(len(pos), 1), device=device))
    weight, hidden = torch.cat(weights), torch.cat(rows)
    del rows
    draws, gold_loss = _draws(hidden, head, torch.cat(targets), weight, spec, compute, softcap)
    row_grads = []
    for draw_targets, draw_weights in draws:
        row_loss, row_grad = _head_loss_and_grad(hidden, head, draw_targets, draw_weights, compute, softcap=softcap)
        row_grads.append(row_grad.split([len(w) for w in weights]))
        gold_loss = row_loss if gold_loss is None else gold_loss
    for j, (h, s) in enumerate(zip(last, captured)):
        h = h.to(device, compute).detach().requires_grad_(True)
        pos, _ = _answer_positions(s.labels.to(device), first)
        normed = norm(h)[0, pos]
        for d, per_sample in enumerate(row_grads):
            normed.backward(per_sample[j].to(normed.dtype), retain_graph=d + 1 < len(row_grads))
            grads.append(h.grad.float())
            h.grad = None
    return float(gold_loss @ weight)


def _module_head_gradients(
    h: torch.Tensor, sample: CapturedSample, at: _Head, grads: ActivationStore, spec: AnswerLoss
) -> float:
    """As :func:`_chunked_head_gradients` for one sample, through a head that is not a plain linear layer
    (plain autograd; predictive labels from the full logits)."""
    norm, head, device, compute, softcap = at.norm, at.head, at.device, at.compute, at.softcap
    h = h.to(device, compute).detach().requires_grad_(True)
    pos, gold = _answer_positions(sample.labels.to(device), spec.tokens == "first")
    logits = _softcapped(head(norm(h)[0, pos]), softcap).float()
    scale = torch.full((len(pos),), 1.0 / max(len(pos), 1), device=device)
    gold_loss = F.cross_entropy(logits, gold, reduction="none")
    draws = _draws_from_logits(logits, gold, scale, spec)
    for d, (targets, weights) in enumerate(draws):
        loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
        loss.backward(retain_graph=d + 1 < len(draws))
        grads.append(h.grad.float())
        h.grad = None
    return float(gold_loss.detach() @ scale)


def _usable_means(raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample of ``raw``: whether it can be normalised, its mean (float64, negatives as 0), and all
    samples' values concatenated (float32, negatives as 0)."""
    sizes = torch.tensor([r.numel() for r in raw])
    flat = torch.cat([r.reshape(-1).float() for r in raw]).clamp_min(0)
    segment = torch.repeat_interleave(torch.arange(len(raw)), sizes)
    means = torch.zeros(len(raw), dtype=torch.float64).index_add_(0, segment, flat.double()) / sizes.clamp_min(1)
    return (means > 0) & torch.isfinite(means), means, flat


def temper_all(raw: list[torch.Tensor], t: Tempering) -> list[torch.Tensor]:
    """:func:`temper` of every sample of ``raw``, computed on all of them at once."""
    if not raw:
        return []
    ok, means, flat = _usable_means(raw)
    sizes = [r.numel() for r in raw]
    counts = torch.tensor(sizes)
    scale = torch.repeat_interleave(torch.where(ok, means, torch.ones_like(means)), counts)
    a = torch.where(torch.repeat_interleave(ok, counts), flat / scale.float(), torch.ones_like(flat))
    a = (1 - t.mix) * a.pow(t.gamma).clamp(t.lo, t.hi) + t.mix
    return [part.reshape(r.shape) for part, r in zip(a.split(sizes), raw)]


def temper(raw: torch.Tensor, t: Tempering) -> torch.Tensor:
    """Normalise one sample's raw importance to mean 1, then temper, clip and mix (zero-free, finite); a sample
    whose importance cannot be normalised (all zero, or not finite) gets uniform weights."""
    return temper_all([raw], t)[0]


def modality_balance(
    raw: list[torch.Tensor], vision_masks: list[torch.Tensor], comm: Comm | None = None
) -> list[torch.Tensor]:
    """MBQ-style weights: every token gets the mean raw importance of its modality (over all samples, all ranks)."""
    comm = comm or Comm()
    vis = torch.cat([r[m] for r, m in zip(raw, vision_masks)]).double()
    txt = torch.cat([r[~m] for r, m in zip(raw, vision_masks)]).double()
    v_sum, v_n, t_sum, t_n = comm.sum(float(vis.sum()), vis.numel(), float(txt.sum()), txt.numel())
    v_mean = v_sum / v_n if v_n else 0.0
    t_mean = t_sum / t_n if t_n else 0.0
    return [torch.where(m, torch.full_like(r, v_mean), torch.full_like(r, t_mean)) for r, m in zip(raw, vision_masks)]


def select_tokens(
    weights: list[torch.Tensor], fraction: float, comm: Comm | None = None, samples: list[int] | None = None
) -> list[torch.Tensor]:
    """Keep the ``ceil(fraction * N)`` most important tokens over all samples (others get weight 0).

    ``N`` counts every rank's tokens; ties at the threshold are kept in global sample order (``samples``
    are the global indices of this rank's ``weights``), so the result does not depend on the sharding.
    """
    if fraction >= 1.0:
        return weights
    comm = comm or Comm()
    samples = list(range(len(weights))) if samples is None else samples
    flat = torch.cat(comm.gather(torch.cat(weights).float()))
    k = max(1, math.ceil(fraction * flat.numel()))
    threshold = torch.topk(flat, k).values.min()
    ties_left = k - int((flat > threshold).sum())
    ties = torch.tensor([[i, int((w == threshold).sum())] for i, w in zip(samples, weights)], dtype=torch.int64)
    quota: dict[int, int] = {}
    for i, n in sorted(torch.cat(comm.gather(ties.reshape(-1, 2))).tolist()):
        quota[i] = min(n, ties_left)
        ties_left -= quota[i]
    kept = []
    for i, w in zip(samples, weights):
        keep = w > threshold
        keep[(w == threshold).nonzero().flatten()[: quota[i]]] = True
        kept.append(torch.where(keep, w, torch.zeros_like(w)))
    return kept


@dataclass
class TokenWeighting:
    """Token weights for a group of modules (or a layer output) from this rank's raw importance.

    A group of modules reading one input (q/k/v) is weighted like one linear with concatenated outputs: its
    raw importance is the sum of its members' (the squared gradient norm over all their outputs). Weights
    are then tempered per sample (or set to the per-modality mean for ``"modality"``) and optionally
    restricted to the most important ``token_fraction`` of all tokens. With ``scope="layer"`` every module of
    a decoder layer is weighted by the gradient at the layer's output instead (``layer_of`` maps a module
    name to its layer index).
    """

    grad: GradientPass
    kind: str
    tempering: Tempering
    token_fraction: float
    vision_masks: list[torch.Tensor]
    samples: list[int]
    comm: Comm
    scope: str = "module"
    layer_of: Callable[[str], int] | None = None

    def _weights(self, raw: list[torch.Tensor], where: str = "") -> list[torch.Tensor]:
        t = self.tempering
        unusable = int((~_usable_means(raw)[0]).sum()) if raw else 0
        if unusable:
            logger.info(
                "tlq_hf: importance %s: %d of %d samples carry no usable gradient (all zero or not finite); their "
                "tokens are weighted uniformly",
                where,
                unusable,
                len(raw),
            )
        if IMPORTANCE_KINDS[self.kind].per_modality:  # the per-modality ratio itself: normalised, clipped, not tempered
            weights = temper_all(modality_balance(raw, self.vision_masks, self.comm), Tempering(1.0, t.lo, t.hi, 0.0))
        else:
            weights = temper_all(raw, t)
        return select_tokens(weights, self.token_fraction, self.comm, self.samples)

    def for_modules(self, names: list[str]) -> list[torch.Tensor]:
        """Per-sample weights ``[T]`` for a group of modules that read the same input."""
        if self.scope == "layer":
            if self.layer_of is None:
                raise ValueError("TokenWeighting(scope='layer') needs layer_of to find a module's layer")
            return self.for_layer(self.layer_of(names[0]))
        per_module = [self.grad.raw[n] for n in names]
        raw = per_module[0] if len(names) == 1 else [torch.stack(parts).sum(0) for parts in zip(*per_module)]
        return self._weights(raw, f"at {names[0]}")

    def partition(self, names: list[str]) -> list[list[str]]:
        """``names`` (modules reading one input) split into groups whose members get the same token weights, in
        order: modules with one output gradient each (q, k, v) alone, modules whose raw importance is the same
        (an expert's gate and up projections, both weighted at the experts module's output; every module with
        ``scope="layer"``) together, so they share one statistic."""
        if self.scope == "layer":
            return [list(names)]
        groups: list[list[str]] = []
        for name in names:
            mine = self.grad.raw[name]
            same = (g for g in groups if all(a is b or torch.equal(a, b) for a, b in zip(self.grad.raw[g[0]], mine)))
            found = next(same, None)
            if found is None:
                groups.append([name])
            else:
                found.append(name)
        return groups

    def for_layer(self, index: int) -> list[torch.Tensor]:
        """Per-sample weights ``[T]`` at the output of decoder layer ``index`` (for error reports)."""
        return self._weights(self.grad.layer_raw[index])
