"""Capture: run the model's own multimodal prefix and stop at decoder layer 0.

A forward pre-hook on the first decoder layer records that layer's input hidden states and call kwargs
(attention mask, position ids, rotary / M-RoPE position embeddings, ...) and raises :class:`StopForward`,
so the vision tower, projector, embedding merge and position computation are whatever the model itself
does. Nothing here knows which architecture it runs. Activations are kept on the ``offload`` device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import DecoderStack, image_token_id
from ..data import CalibrationSample

__all__ = ["StopForward", "CapturedSample", "capture_layer_inputs", "to_device", "layer_forward", "module_device"]

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by the capture hook once decoder layer 0 has its input."""


@dataclass
class CapturedSample:
    """Layer-0 input of one sample and what every decoder layer is called with."""

    hidden: torch.Tensor  # [1, T, H]
    kwargs: dict[str, Any]  # decoder layer call kwargs (tensors on the offload device)
    labels: torch.Tensor  # [1, T]; -100 outside the answer
    vision_mask: torch.Tensor  # [T] bool: image tokens
    answer_mask: torch.Tensor  # [T] bool: answer tokens (labels != -100)


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


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, stack: DecoderStack, samples: list[CalibrationSample], offload: str = "cpu"
) -> list[CapturedSample]:
    """Run each sample up to decoder layer 0 and return its captured inputs."""
    first = stack.layers[0]
    record: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        record["hidden"], record["kwargs"] = hidden, kwargs
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = module_device(model)
    img_id = image_token_id(model.config)
    captured = []
    try:
        for sample in tqdm(samples, desc="tlq capture", unit="sample", leave=False):
            inputs = to_device(sample.inputs, device)
            try:
                model(**inputs, use_cache=False)
            except StopForward:
                pass
            else:
                raise RuntimeError("decoder layer 0 was never called: cannot capture calibration inputs")
            ids = sample.inputs["input_ids"][0]
            captured.append(
                CapturedSample(
                    hidden=record["hidden"].detach().to(offload),
                    kwargs=to_device(record["kwargs"], offload),
                    labels=sample.labels,
                    vision_mask=(ids == img_id) if img_id is not None else torch.zeros_like(ids, dtype=torch.bool),
                    answer_mask=sample.labels[0] != -100,
                )
            )
    finally:
        handle.remove()
    return captured
