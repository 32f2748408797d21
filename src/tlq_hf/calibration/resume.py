"""Resumable calibration: per-layer checkpoints bound to a fingerprint of model, data and config.

Layout of ``checkpoint_dir``:

- ``manifest.json``: fingerprint, world size, layers finished, their reports, the answer loss
  (written last, atomically: it is the commit record);
- ``importance-rank{r}.safetensors``: rank ``r``'s raw token importance (per module and per layer output),
  so a restart skips the gradient pass;
- ``layer-{i:05d}.safetensors``: decoder layer ``i`` after calibration (packed buffers, folded norms, biases),
  with the names of its packed modules in the metadata (rank 0 writes it);
- ``acts-{i:05d}-rank{r}.safetensors``: rank ``r``'s inputs of layer ``i`` (full precision and exposed),
  i.e. what is needed to continue after ``i`` finished layers.

Every file is written under a temporary name and renamed. A layer counts as finished only once the manifest
says so; files of an unfinished layer are simply overwritten by the restarted run. A folder written for
another model, data set, config or number of processes is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..arch import DecoderStack
from ..formats.atomic import atomic_file
from ..nn import TLQLinear
from ..qtypes import QuantScheme
from .activations import ActivationStore
from .capture import CapturedSample
from .distributed import Comm
from .importance import GradientPass
from .journal import ModelEdits
from .layer_loop import LayerReport, LoopState
from .offload import onloaded

__all__ = ["CheckpointMismatchError", "LayerCheckpoint", "fingerprint"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to another run (model, data, config or process count)."""


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _atomic_json(obj: Any, path: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True))


def _load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def fingerprint(config_dict: dict, model: nn.Module, stack: DecoderStack, captured: list[CapturedSample]) -> str:
    """A digest of the quantization settings, the model (config, tensor names / shapes / dtypes, the first
    decoder layer's weights) and this rank's calibration inputs (layer-0 inputs, labels)."""
    h = hashlib.sha256()
    h.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    with onloaded(stack.layers[0]):
        for t in stack.layers[0].state_dict().values():
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for s in captured:
        h.update(s.hidden.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(s.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LayerCheckpoint:
    """The checkpoint folder of one calibration run (every rank holds one; rank 0 writes shared files)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, comm: Comm | None = None) -> None:
        self.folder, self.comm = os.fspath(folder), comm or Comm()
        self.fingerprints = self._all_fingerprints(fingerprint)
        os.makedirs(self.folder, exist_ok=True)
        self.manifest: dict[str, Any] = {"fingerprints": self.fingerprints, "world": self.comm.world, "layers_done": 0}

    def _all_fingerprints(self, mine: str) -> list[str]:
        digest = torch.frombuffer(bytearray(bytes.fromhex(mine)), dtype=torch.uint8)
        return [bytes(t.tolist()).hex() for t in self.comm.gather(digest)]

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def open(self) -> int:
        """How many layers a previous run finished here (0 for a fresh folder); refuses a foreign folder."""
        path = self._path(MANIFEST)
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            found = json.load(f)
        if found.get("world") != self.comm.world:
            raise CheckpointMismatchError(
                f"{self.folder} was written by a run with {found.get('world')} process(es), this one has "
                f"{self.comm.world}: restart with the same number of processes, or use a new checkpoint_dir."
            )
        if found.get("fingerprints") != self.fingerprints:
            raise CheckpointMismatchError(
                f"{self.folder} holds a calibration of a different model, data set or TLQConfig: its fingerprint "
                "does not match this run. Use a new (or empty) checkpoint_dir, or restore the original settings."
            )
        self.manifest = found
        logger.warning("tlq_hf: resuming from %s: %d layer(s) finished", self.folder, found["layers_done"])
        return int(found["layers_done"])

    # importance -------------------------------------------------------------------------------------
    def has_importance(self) -> bool:
        return bool(self.manifest.get("importance"))

    def save_importance(self, grad: GradientPass) -> None:
        tensors = {f"module.{n}.{j}": t for n, ts in grad.raw.items() for j, t in enumerate(ts)}
        tensors |= {f"layer.{i}.{j}": t for i, ts in enumerate(grad.layer_raw) for j, t in enumerate(ts)}
        meta = {"modules": json.dumps(list(grad.raw)), "layers": str(len(grad.layer_raw))}
        _atomic_save(tensors, self._path(f"importance-rank{self.comm.rank}.safetensors"), meta)
        self.comm.barrier()
        if self.comm.is_main:
            self.manifest |= {"importance": True, "answer_loss": grad.loss}
            _atomic_json(self.manifest, self._path(MANIFEST))
        self.comm.barrier()

    def load_importance(self, n_samples: int) -> GradientPass:
        tensors, meta = _load(self._path(f"importance-rank{self.comm.rank}.safetensors"))
        raw = {n: [tensors[f"module.{n}.{j}"] for j in range(n_samples)] for n in json.loads(meta["modules"])}
        layer_raw = [[tensors[f"layer.{i}.{j}"] for j in range(n_samples)] for i in range(int(meta["layers"]))]
        return GradientPass(raw, layer_raw, float(self.manifest["answer_loss"]))

    # layers -----------------------------------------------------------------------------------------
    def commit(self, state: LoopState, layer: nn.Module) -> None:
        """Record that layers ``0..state.layer-1`` are finished (``layer`` is the one just calibrated)."""
        done = state.layer
        if self.comm.is_main:
            meta = {"packed": json.dumps([n for n, m in layer.named_modules() if isinstance(m, TLQLinear)])}
            with onloaded(layer, upcast=False):  # a layer kept on disk by the device map is read back
                tensors = layer.state_dict()
            _atomic_save(tensors, self._path(f"layer-{done - 1:05d}.safetensors"), meta)
        acts = {f"fp.{j}": t for j, t in enumerate(state.x_fp)}
        if state.x_in is not state.x_fp:
            acts |= {f"in.{j}": t for j, t in enumerate(state.x_in)}
        _atomic_save(acts, self._path(f"acts-{done:05d}-rank{self.comm.rank}.safetensors"))
        self.comm.barrier()
        if self.comm.is_main:
            self.manifest |= {"layers_done": done, "reports": [asdict(r) for r in state.reports]}
            _atomic_json(self.manifest, self._path(MANIFEST))
        self.comm.barrier()
        old = self._path(f"acts-{done - 1:05d}-rank{self.comm.rank}.safetensors")
        if os.path.exists(old):
            os.remove(old)

    def restore(
        self,
        model: nn.Module,
        stack: DecoderStack,
        scheme: QuantScheme,
        done: int,
        spill_dir: str | None,
        edits: ModelEdits | None = None,
    ) -> LoopState:
        """Swap the finished layers' saved contents in and return the loop state after layer ``done - 1``
        (through ``edits``, so that a failed run can undo it)."""
        edits = edits or ModelEdits(model)
        for i in range(done):
            tensors, meta = _load(self._path(f"layer-{i:05d}.safetensors"))
            layer, prefix = stack.layers[i], stack.layer_prefix(i)
            edits.will_rehome(layer)
            with torch.no_grad(), onloaded(layer, keep=True) as on:
                for rel in json.loads(meta["packed"]):
                    old = layer.get_submodule(rel)
                    new = TLQLinear(
                        old.in_features,
                        old.out_features,
                        scheme,
                        bias=f"{rel}.bias" in tensors,
                        dtype=tensors[f"{rel}.weight_scale"].dtype,
                        device=on.device,
                    )
                    edits.swap(f"{prefix}.{rel}", new)
                edits.will_write(list(layer.state_dict(keep_vars=True).values()))
                missing, unexpected = layer.load_state_dict(tensors, strict=False)
                if missing or unexpected:
                    raise CheckpointMismatchError(
                        f"layer {i} in {self.folder} does not fit the model (missing {missing}, unexpected "
                        f"{unexpected}): use a new checkpoint_dir."
                    )
        acts, _ = _load(self._path(f"acts-{done:05d}-rank{self.comm.rank}.safetensors"))
        n = sum(1 for k in acts if k.startswith("fp."))
        x_fp = ActivationStore.of([acts[f"fp.{j}"] for j in range(n)], spill_dir, "x_fp")
        x_in = (
            x_fp if "in.0" not in acts else ActivationStore.of([acts[f"in.{j}"] for j in range(n)], spill_dir, "x_in")
        )
        reports = [LayerReport(**r) for r in self.manifest.get("reports", [])]
        return LoopState(done, x_fp, x_in, reports)
