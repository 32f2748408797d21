"""Capture: run the model's own multimodal prefix and record what every decoder layer is called with.

While capturing, each decoder layer's forward is stood in for by a recorder that keeps the layer's input
hidden states (layer 0) and call kwargs (attention mask, position ids, rotary / M-RoPE position embeddings,
...) and passes the hidden states on untouched; the last one raises :class:`StopForward`. So the vision tower,
projector, embedding merge and position computation are whatever the model itself does, no decoder weight is
read, and layers that the model calls differently (Gemma 3's sliding-window and global layers get different
masks and RoPE tables) each keep their own kwargs. Nothing here knows which architecture it runs.
Activations are kept on the ``offload`` device; layers called alike share one kwargs dict.

What the model adds to the hidden states between two layers (Qwen3-VL's deepstack: visual features of
intermediate vision layers added at the image tokens after decoder layers 0, 1, 2) is seen the same way: the
recorders pass each layer's input on unchanged, so the next layer's input minus it is the addition. It is kept
per sample as an :class:`Injection` and replayed after that layer wherever layers are run one at a time
(:meth:`CapturedSample.after_layer`). A change that depends on the hidden states (not a plain addition) is
refused: the layers could not be replayed one at a time.

"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack, image_token_id
from ..data import CalibrationSample

__all__ = [
    "StopForward",
    "CapturedSample",
    "Injection",
    "after_layer",
    "capture_layer_inputs",
    "to_device",
    "layer_forward",
    "module_device",
]

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the capture hook once decoder layer 0 has its input."""


@dataclass
class Injection:
    """What the model adds to one sample's hidden states after a decoder layer: ``values [n, H]`` at token rows
    ``rows [n]`` (e.g. Qwen3-VL's deepstack visual features at the image tokens), whatever the hidden states are."""

    rows: torch.Tensor  # [n] int64
    values: torch.Tensor  # [n, H]

    @classmethod
    def of(cls, delta: torch.Tensor) -> Injection | None:
        """From a difference ``[1, T, H]`` of hidden states (``None`` if it is zero)."""
        rows = delta[0].ne(0).any(-1).nonzero().flatten()
        return cls(rows, delta[0, rows].clone()) if rows.numel() else None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [1, T, H]`` with the addition made (out of place: autograd sees a plain add)."""
        return hidden.index_add(1, self.rows.to(hidden.device), self.values[None].to(hidden.device, hidden.dtype))


@dataclass
class CapturedSample:
    """Layer-0 input of one sample and what every decoder layer is called with."""

    hidden: torch.Tensor  # [1, T, H]
    # per decoder layer, its call kwargs (tensors on the offload device); layers called alike share one dict
    layer_kwargs: list[dict[str, Any]]
    labels: torch.Tensor  # [1, T]; -100 outside the answer
    vision_mask: torch.Tensor  # [T] bool: image tokens
    answer_mask: torch.Tensor  # [T] bool: answer tokens (labels != -100)
    # what the model adds to the hidden states after decoder layer i, before layer i + 1 (see Injection)
    injections: dict[int, Injection] = field(default_factory=dict)

    @property
    def kwargs(self) -> dict[str, Any]:
        """Decoder layer 0's call kwargs."""
        return self.layer_kwargs[0]

    def kwargs_for(self, index: int) -> dict[str, Any]:
        """Decoder layer ``index``'s call kwargs."""
        return self.layer_kwargs[index]

    def after_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s output ``[1, T, H]`` as the next layer receives it (see :class:`Injection`)."""
        injection = self.injections.get(index)
        return hidden if injection is None else injection.apply(hidden)


def after_layer(samples: list[CapturedSample], index: int, hidden: torch.Tensor) -> torch.Tensor:
    """:meth:`CapturedSample.after_layer` of a batch: ``hidden [B, T, H]``, row ``b`` of ``samples[b]``."""
    if not any(index in s.injections for s in samples):
        return hidden
    return torch.cat([s.after_layer(index, row) for s, row in zip(samples, hidden.split(1))])


def to_device(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to ``device`` (floating ones to ``dtype`` if given)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder layer and return its output hidden states (tuple outputs on transformers 4.x)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate execution device, else its first materialised tensor's."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


# call kwargs that are per-run state, not layer inputs
_DROPPED_KWARGS = ("past_key_value", "past_key_values", "cache")


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same call argument: one object, or equal tensors / containers / values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _shared(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``calls`` with every dict equal to an earlier one replaced by that earlier dict object."""
    distinct: list[dict[str, Any]] = []
    out = []
    for kwargs in calls:
        match = next((d for d in distinct if d.keys() == kwargs.keys() and _same(d, kwargs)), None)
        if match is None:
            distinct.append(kwargs)
            match = kwargs
        out.append(match)
    return out


def _offloaded(calls: list[dict[str, Any]], device: torch.device | str) -> list[dict[str, Any]]:
    """Each distinct kwargs dict of ``calls`` moved to ``device`` once (shared dicts stay shared)."""
    moved: dict[int, dict[str, Any]] = {}
    return [moved.setdefault(id(kwargs), to_device(kwargs, device)) for kwargs in calls]


class _IndexedOutputs(Exception):
    """The model took ``output[0]`` of a recorder that returned a bare tensor: it expects tuple outputs."""


class _LayerRecorder:
    """Stands in for every decoder layer's forward (a scoped swap of the instance's ``forward``).

    Each recorder keeps its layer's call kwargs and passes the hidden states it got on; layer 0's keeps its input
    hidden states too, and the last layer's raises :class:`StopForward`. Layers return a bare tensor on
    transformers 5 but ``(hidden_states, ...)`` on many 4.x models, whose decoder loop keeps ``output[0]``: the
    recorders return a tensor until layer 1 receives a slice of it (the loop indexed it), then tuples
    (``wrap``). The layers' own forwards (with any accelerate hook wrapped around them) are put back on exit.
    """

    _UNSET = object()

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.hidden: torch.Tensor | None = None
        self.calls: list[dict[str, Any] | None] = [None] * len(layers)
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)  # each layer's input hidden states
        self.passed: list[torch.Tensor | None] = [None] * len(layers)  # what each recorder passed on
        self.offset = 0.0  # added to what each recorder passes on (the additivity probe)
        self.wrap = False
        self._saved: list[Any] = []

    def reset(self) -> None:
        self.hidden, self.calls = None, [None] * len(self.layers)
        self.inputs, self.passed = [None] * len(self.layers), [None] * len(self.layers)

    def differences(self) -> dict[int, torch.Tensor]:
        """Layer ``i`` -> the next layer's input minus what layer ``i``'s recorder passed on, where they differ."""
        out = {}
        for i, (passed, nxt) in enumerate(zip(self.passed[:-1], self.inputs[1:])):
            if nxt is not passed and passed is not None and nxt is not None and bool((d := nxt - passed).ne(0).any()):
                out[i] = d
        return out

    def _forward(self, index: int):
        last = index == len(self.layers) - 1

        def forward(*args: Any, **kwargs: Any) -> Any:
            if len(args) > 1:
                raise RuntimeError(
                    f"decoder layer {index} was called with {len(args)} positional arguments; tlq_hf replays "
                    "decoder layers as layer(hidden_states, **kwargs) and cannot capture this model's calls"
                )
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                self.hidden = hidden
            elif not self.wrap and getattr(hidden, "shape", None) != self.hidden.shape:
                raise _IndexedOutputs
            self.calls[index] = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            self.inputs[index] = hidden
            if last:
                raise StopForward
            passed = hidden + self.offset if self.offset else hidden
            self.passed[index] = passed
            return (passed,) if self.wrap else passed

        return forward

    def __enter__(self) -> _LayerRecorder:
        for i, layer in enumerate(self.layers):
            self._saved.append(layer.__dict__.get("forward", self._UNSET))
            layer.forward = self._forward(i)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, saved in zip(self.layers, self._saved):
            if saved is self._UNSET:
                del layer.forward
            else:
                layer.forward = saved
        self._saved.clear()


def _run_prefix(model: nn.Module, inputs: dict[str, Any], recorder: _LayerRecorder) -> None:
    """One forward of ``model`` on ``inputs`` through the recorders (again with tuple outputs if it indexes them)."""
    for _ in range(2):
        recorder.reset()
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            return
        except _IndexedOutputs:
            recorder.wrap = True
            continue
        return


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, stack: DecoderStack, samples: list[CalibrationSample], offload: str = "cpu"
) -> list[CapturedSample]:
    """Run each sample's prefix through the model and return what each decoder layer is called with."""
    device = module_device(model)
    img_id = image_token_id(model.config)
    captured = []
    checked = False
    with _LayerRecorder(stack.layers) as recorder:
        for sample in tqdm(samples, desc="tlq capture", unit="sample", leave=False):
            inputs = to_device(sample.inputs, device)
            _run_prefix(model, inputs, recorder)
            missing = [i for i, call in enumerate(recorder.calls) if call is None]
            if missing:
                raise RuntimeError(f"decoder layers {missing} were never called: cannot capture calibration inputs")
            hidden, calls, differences = recorder.hidden, recorder.calls, recorder.differences()
            if differences and not checked:  # once per run: the model's way between layers does not change
                _check_additive(model, inputs, recorder, differences)
                checked = True
            injections = {i: inj for i, d in differences.items() if (inj := Injection.of(d.detach().to(offload)))}
            ids = sample.inputs["input_ids"][0]
            captured.append(
                CapturedSample(
                    hidden=hidden.detach().to(offload),
                    layer_kwargs=_offloaded(_shared(calls), offload),
                    labels=sample.labels,
                    vision_mask=(ids == img_id) if img_id is not None else torch.zeros_like(ids, dtype=torch.bool),
                    answer_mask=sample.labels[0] != -100,
                    injections=injections,
                )
            )
    if any(s.injections for s in captured):
        layers = sorted({i for s in captured for i in s.injections})
        logger.info("tlq_hf: capture: the model adds to the hidden states after decoder layers %s (replayed)", layers)
    return captured


def _check_additive(
    model: nn.Module, inputs: dict[str, Any], recorder: _LayerRecorder, seen: dict[int, torch.Tensor]
) -> None:
    """Refuse a model whose change of the hidden states between two decoder layers depends on them: run the prefix
    again with every recorder passing on its input plus a constant, and compare the differences."""
    hidden = recorder.hidden
    c = 1.0 + float(hidden.abs().max())
    recorder.offset = c
    try:
        _run_prefix(model, inputs, recorder)
        again = recorder.differences()
    finally:
        recorder.offset = 0.0
    eps = torch.finfo(hidden.dtype).eps if hidden.is_floating_point() else 0.0
    for i, d in seen.items():
        other = again.get(i)
        tol = 8 * eps * (c + float(hidden.abs().max()) + float(d.abs().max()))
        if other is None or float((other - d).abs().max()) > tol:
            raise RuntimeError(
                f"{type(model).__name__}: between decoder layers {i} and {i + 1} the model changes the hidden states "
                "in a way that depends on them (not a plain addition); tlq_hf calibrates decoder layers one at a time "
                "and cannot replay it. Quantize this model with method='rtn' (no calibration data) or report the "
                "architecture."
            )
