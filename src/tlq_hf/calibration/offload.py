"""Bringing one decoder layer onto its execution device, and leaving it where it can live afterwards.

``from_pretrained(..., device_map=...)`` may leave a layer's weights on ``"meta"`` with an accelerate hook
that loads them from the CPU or the offload folder at every forward. Calibration runs the same layer many
times, so :func:`onloaded` materialises every tensor of the layer once on its execution device for the
whole block (and keeps the hooks from offloading in between). The dtype a layer computes in is the calibration
precision's (:func:`calibration_precision`, ``TLQConfig.calibration_dtype``): with ``"auto"`` a half-precision
layer computes in its own dtype where the device has native matmuls for it (accelerators; a CPU with AVX512-BF16
or AMX for bfloat16) and in float32 elsewhere (on an AVX2 CPU bf16 matmuls in the backward layout are two orders
of magnitude slower); ``"float32"`` upcasts everywhere. Activations stay stored in the model dtype.

On exit the layer is put back exactly as it was (``keep=False``: full-precision passes), or, after
calibration swapped packed modules in (``keep=True``), settled: every remaining tensor returns to its
original dtype. A layer the map put on disk goes back to disk in its packed form (one safetensors file in
the offload folder's ``tlq-packed/``, which its hooks then load per forward, as they loaded the original
weights), so host memory does not grow with depth; any other layer stays materialised on its execution
device, where the packed form (about 0.27x the bf16 bytes) fits where the original weights did.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..experts import UnfusedExperts, expert_tensors
from ..formats.atomic import atomic_file
from ..hostmem import release_host_memory
from .capture import module_device
from .io_clock import timed_io

__all__ = [
    "CALIBRATION_DTYPES",
    "ExpertSlices",
    "Onloaded",
    "calibration_precision",
    "cpu_has_native_bf16",
    "all_hooks",
    "PackedLayerFile",
    "offload_unfused_experts",
    "onloaded",
    "row_reader",
    "compute_dtype_for",
    "with_disk_layers_loaded",
]

_HALF = (torch.float16, torch.bfloat16)
#: the values of ``TLQConfig.calibration_dtype``
CALIBRATION_DTYPES = ("auto", "float32")
_PRECISION: ContextVar[str] = ContextVar("tlq_calibration_precision", default="auto")
#: CPU flags of native bfloat16 matmuls (oneDNN uses them for bf16 GEMMs, forward and backward layouts)
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bfloat16 matmuls (AVX512-BF16 or AMX, read from ``/proc/cpuinfo``; ``False``
    where that cannot be read). ``TLQ_CPU_BF16=0`` / ``=1`` in the environment overrides the answer (the test
    suite sets 0, so its results do not depend on the machine)."""
    forced = os.environ.get("TLQ_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(_cpuinfo_flags() & _BF16_FLAGS)


@contextmanager
def calibration_precision(dtype: str) -> Iterator[None]:
    """Within the block, layers onloaded for calibration compute as ``dtype`` says (one of
    :data:`CALIBRATION_DTYPES`; see :func:`compute_dtype_for`)."""
    if dtype not in CALIBRATION_DTYPES:
        raise ValueError(f"calibration dtype {dtype!r}: use one of {CALIBRATION_DTYPES}")
    token = _PRECISION.set(dtype)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def compute_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer stored in ``dtype`` computes in on ``device`` during calibration: float32 for half
    precision under ``calibration_precision("float32")``; under ``"auto"`` (the default) its own dtype on an
    accelerator and for bfloat16 on a CPU with native bf16 matmuls (:func:`cpu_has_native_bf16`), else float32."""
    if dtype not in _HALF:
        return dtype
    if _PRECISION.get() == "float32":
        return torch.float32
    if device.type != "cpu":
        return dtype
    return dtype if dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class Onloaded:
    """Where and in which dtype an onloaded layer computes, and the dtype its activations are stored in."""

    device: torch.device
    compute_dtype: torch.dtype
    store_dtype: torch.dtype
    # (module, name, is_param, original tensor) of every tensor replaced by an onloaded copy
    saved: list = field(default_factory=list, repr=False, compare=False)

    def release(self, module: nn.Module) -> None:
        """Give ``module``'s onloaded copies back now: it was swapped out of the layer and nothing reads it.

        Its original tensors return (as on exit), so a layer being replaced module by module never holds
        the float32 copies of the modules already packed.
        """
        members = {id(m) for m in module.modules()}
        kept = []
        for entry in self.saved:
            owner, name, is_param, tensor = entry
            if id(owner) in members:
                (owner._parameters if is_param else owner._buffers)[name] = tensor
            else:
                kept.append(entry)
        self.saved[:] = kept


def _offload_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return hook if getattr(hook, "offload", False) else None


def _holds(weights: Mapping, name: str) -> bool:
    """``name in weights`` without reading the tensor (a ``Mapping``'s own ``in`` loads it to find out)."""
    if isinstance(weights, PrefixedDataset):
        return _holds(weights.dataset, weights.prefix + name)
    if isinstance(weights, OffloadedWeightsLoader):
        return name in weights.state_dict or name in weights.index
    if isinstance(weights, (dict, PackedLayerFile, ExpertSlices)):
        return name in weights
    return any(key == name for key in weights)


def all_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", [hook])) if hook is not None else []


class _ScratchUpcast:
    """Computes ``nn.Linear`` calls in float32 from half-precision stored weights, a band of output rows at a
    time: each band of the weight is cast into one small float32 buffer shared by every linear of the layer
    (at most :data:`SCRATCH_ELEMENTS`), so no float32 copy of a whole weight ever exists.

    Installed by replacing each linear's ``forward`` (its hooks still run); no-grad passes only: autograd
    would save the buffer, which the next band overwrites. Each band is a matmul over the full input width, so
    outputs differ from a whole float32 weight's only by the BLAS kernel's summation order (bit-identical at
    decoder shapes measured: 270 x 8192 @ 8192 x 2048, same speed).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.buffer: torch.Tensor | None = None
        self.replaced: list[tuple[nn.Module, object]] = []  # (module, its own ``forward`` attribute or None)

    def install(self, module: nn.Linear) -> None:
        self.replaced.append((module, module.__dict__.get("forward")))
        module.forward = functools.partial(self.forward, module)

    def remove(self) -> None:
        for module, own in self.replaced:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self.replaced.clear()
        self.buffer = None

    def _band(self, n: int, device: torch.device) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < n or self.buffer.device != device:
            self.buffer = None  # release before the larger one is allocated
            self.buffer = torch.empty(n, dtype=self.dtype, device=device)
        return self.buffer[:n]

    def forward(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("a layer onloaded with scratch=True runs under torch.no_grad() only")
        weight, bias = module.weight, module.bias
        out_f, in_f = weight.shape
        rows = max(1, min(out_f, SCRATCH_ELEMENTS // in_f))
        if rows == out_f:
            return F.linear(x, self._band(out_f * in_f, weight.device).view(out_f, in_f).copy_(weight), bias)
        y = x.new_empty((*x.shape[:-1], out_f))
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            band = self._band((r1 - r0) * in_f, weight.device).view(r1 - r0, in_f).copy_(weight[r0:r1])
            y[..., r0:r1] = F.linear(x, band, None if bias is None else bias[r0:r1])
        return y


SCRATCH_ELEMENTS = 1 << 22  # float32 elements of the shared band buffer (16 MiB)


@contextmanager
def onloaded(layer: nn.Module, keep: bool = False, upcast: bool = True, scratch: bool = False) -> Iterator[Onloaded]:
    """Materialise ``layer`` on its execution device (float32 on CPU for half dtypes unless ``upcast=False``).

    With ``scratch`` (no-grad passes) the weights of its ``nn.Linear`` modules keep their stored dtype and
    are cast per call, a band of rows at a time, into one small shared float32 buffer (:class:`_ScratchUpcast`):
    the layer never holds a float32 copy of any whole weight (0.5x the float32 layer, for a bf16 layer).

    (One context manager on purpose: every way out, exceptions included, must put the layer back as it was.)
    """
    device = module_device(layer)
    saved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []  # (module, name, is_param, original tensor)
    original_dtype: dict[tuple[int, str], torch.dtype] = {}
    paused = []
    store_dtype = None
    caster = _ScratchUpcast(torch.float32)
    try:  # a failure while onloading also undoes what was onloaded so far
        for module in layer.modules():
            hook = _offload_hook(module)
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None:
                    continue
                is_param = name in module._parameters
                value = tensor
                if tensor.device.type == "meta":
                    if hook is None or not _holds(hook.weights_map, name):
                        raise RuntimeError(
                            f"{type(module).__name__}.{name} is on 'meta' with no offloaded copy to load"
                        )
                    with timed_io():
                        value = hook.weights_map[name]
                if value.is_floating_point():
                    store_dtype = store_dtype or value.dtype
                    dtype = compute_dtype_for(device, value.dtype) if upcast else value.dtype
                    original_dtype[(id(module), name)] = value.dtype
                    if scratch and dtype != value.dtype and name == "weight" and isinstance(module, nn.Linear):
                        caster.dtype, dtype = dtype, value.dtype
                        caster.install(module)
                else:
                    dtype = value.dtype
                if value.device == device and value.dtype == dtype and value is tensor:
                    continue
                with timed_io():
                    new = value.to(device=device, dtype=dtype)
                saved.append((module, name, is_param, tensor))
                if is_param:
                    module._parameters[name] = nn.Parameter(new, requires_grad=tensor.requires_grad)
                else:
                    module._buffers[name] = new
            for h in all_hooks(module):
                if getattr(h, "offload", False):
                    h.offload = False
                    paused.append(h)
        store_dtype = store_dtype or torch.float32
        yield Onloaded(device, compute_dtype_for(device, store_dtype), store_dtype, saved)
    except BaseException:
        keep = False
        raise
    finally:
        caster.remove()
        if keep:
            _settle(layer, original_dtype, saved)
            folder = _disk_folder(paused)
            if folder is not None:
                _offload_to_disk(layer, folder)
        else:
            for module, name, is_param, tensor in saved:
                (module._parameters if is_param else module._buffers)[name] = tensor
            for h in paused:
                h.offload = True
        saved.clear()
        release_host_memory()


def row_reader(module: nn.Module, name: str = "weight") -> Callable[[int, int], torch.Tensor]:
    """``rows(lo, hi)``: rows ``lo:hi`` of ``module.<name>``, read from where the tensor lives.

    A tensor the device map put on disk is read one slice at a time from its safetensors file (or the
    offload folder's ``.dat`` file), so a large matrix (an ``lm_head`` over a 128k-152k vocabulary: 0.5-1 GB
    in bf16) is never resident, neither copied nor mapped whole. A resident tensor is sliced.
    """
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return lambda lo, hi: tensor[lo:hi]
    hook = _offload_hook(module)
    weights = getattr(hook, "weights_map", None)
    if weights is None or not _holds(weights, name):
        raise RuntimeError(f"{type(module).__name__}.{name} is on 'meta' with no offloaded copy to read")
    loader, key = getattr(weights, "dataset", None), getattr(weights, "prefix", "") + name
    info = loader.index.get(key) if isinstance(loader, OffloadedWeightsLoader) else None
    if info is None or key in loader.state_dict:  # not a file of the offload index: read it whole, once
        with timed_io():
            whole = weights[name]
        return lambda lo, hi: whole[lo:hi]
    if info.get("safetensors_file") is not None:

        def read(lo: int, hi: int) -> torch.Tensor:
            with timed_io(), safe_open(info["safetensors_file"], framework="pt") as f:
                rows = f.get_slice(info.get("weight_name", key))[lo:hi]
            return rows.to(getattr(torch, info["dtype"])) if "dtype" in info else rows

        return read
    stored = "int16" if info["dtype"] == "bfloat16" else info["dtype"]

    def read_dat(lo: int, hi: int) -> torch.Tensor:
        with timed_io():
            mapped = np.memmap(os.path.join(loader.save_folder, f"{key}.dat"), stored, "r", shape=tuple(info["shape"]))
            rows = torch.from_numpy(np.array(mapped[lo:hi]))
            del mapped
        return rows.view(torch.bfloat16) if info["dtype"] == "bfloat16" else rows

    return read_dat


class ExpertSlices(Mapping):
    """The per-expert tensors of one offloaded fused experts module, keyed as its :class:`UnfusedExperts` names
    them (``"3.gate_proj.weight"``), each read from the fused tensors' offloaded copy one expert at a time (row
    ``e`` of each ``[E, ...]`` tensor, via :func:`row_reader`): the ``weights_map`` of the per-expert linears'
    hooks, so a layer's experts load like any offloaded linear and no fused tensor is ever read whole."""

    def __init__(self, fused: nn.Module, unfused: UnfusedExperts) -> None:
        self.layout = unfused.layout
        self._readers = {n: row_reader(fused, n) for n in self.layout.fused_names}
        self.folder = _disk_folder(all_hooks(fused))  # the offload folder, if the fused tensors were on disk
        linears = [(m, mod) for m, mod in unfused.named_modules() if isinstance(mod, nn.Linear)]
        self._keys = [f"{m}.{p}" for m, mod in linears for p, _ in mod.named_parameters(recurse=False)]
        # one expert's tensors between reads of its projections (gate and up come from one read); dropped once
        # each has been read, so nothing outlives the layer's onload
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        e, _, local = key.partition(".")
        cached = self._last
        if cached is None or cached[0] != int(e) or local not in cached[1]:
            # copies: a safetensors slice is a view of the whole mapped file, which would stay mapped (and its
            # pages resident) as long as any expert read from it lives
            fused = {n: read(int(e), int(e) + 1)[0].clone() for n, read in self._readers.items()}
            cached = self._last = (int(e), dict(expert_tensors(self.layout, fused)))
        out = cached[1].pop(local).contiguous()
        if not cached[1]:
            self._last = None
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def offload_unfused_experts(fused: nn.Module, unfused: UnfusedExperts) -> None:
    """Give the per-expert linears of ``unfused`` (built on ``meta`` from the offloaded ``fused``) accelerate hooks
    like the one ``fused`` had, each loading its own weight from an :class:`ExpertSlices` at every forward; a
    calibrated layer's packed experts then go back to disk with the rest of it (:func:`onloaded`)."""
    hook = _offload_hook(fused)
    if hook is None:
        raise RuntimeError(f"{type(fused).__name__}: experts on 'meta' without an offloading hook to read them from")
    slices = ExpertSlices(fused, unfused)
    for name, module in unfused.named_modules():
        if isinstance(module, nn.Linear):
            add_hook_to_module(
                module,
                AlignDevicesHook(
                    execution_device=hook.execution_device,
                    offload=True,
                    io_same_device=False,
                    weights_map=PrefixedDataset(slices, f"{name}."),
                    offload_buffers=hook.offload_buffers,
                    place_submodules=False,
                    skip_keys=hook.skip_keys,
                    tied_params_map=hook.tied_params_map,
                ),
            )


def _settle(layer: nn.Module, original_dtype: dict[tuple[int, str], torch.dtype], saved: list) -> None:
    """After calibration: tensors back to their stored dtype, resident; hooks only align devices.

    Modules swapped out of the layer get their original tensors back, so no onloaded copy outlives the block.
    """
    present = {id(m) for m in layer.modules()}
    for module, name, is_param, tensor in saved:
        if id(module) not in present:
            (module._parameters if is_param else module._buffers)[name] = tensor
    for module in layer.modules():
        for h in all_hooks(module):
            h.offload = False  # a swapped-in packed module carries the old hook too
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            dtype = original_dtype.get((id(module), name))
            if tensor is None or dtype is None or tensor.dtype == dtype:
                continue
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = tensor.to(dtype)


def _disk_folder(hooks: list) -> str | None:
    """The device map's offload folder when the layer's weights were read from disk (not from a CPU copy)."""
    for hook in hooks:
        weights = getattr(hook, "weights_map", None)
        loader, prefix = getattr(weights, "dataset", None), getattr(weights, "prefix", None)
        if isinstance(loader, ExpertSlices) and loader.folder is not None:
            return loader.folder
        folder = getattr(loader, "save_folder", None)
        if (
            folder is not None
            and prefix is not None
            and any(k.startswith(prefix) for k in getattr(loader, "index", {}))
        ):
            return folder
    return None


class PackedLayerFile(Mapping):
    """The settled tensors of one calibrated layer in one safetensors file: the ``weights_map`` its accelerate
    hooks load from at every forward, as they did from the device map's own offloaded weights."""

    def __init__(self, path: str) -> None:
        self.path = path
        with safe_open(path, framework="pt") as f:
            self._keys = list(f.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with timed_io(), safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


_packed_ids = itertools.count()


def _offload_to_disk(layer: nn.Module, folder: str) -> None:
    """Write the settled layer to ``folder`` and leave it there: its modules' hooks load it per forward.

    Where the device map put a layer on disk, its packed form goes back to disk (about 0.27x the bf16
    bytes), so host memory does not grow with depth. Tensors of modules without an accelerate hook, and
    non-persistent buffers, stay resident.
    """
    owners: list[tuple[str, nn.Module, object, list[str]]] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, module in layer.named_modules():
        hooks = [h for h in all_hooks(module) if hasattr(h, "weights_map")]
        if not hooks:
            continue
        local = [
            (n, t)
            for n, t in [*module._parameters.items(), *module._buffers.items()]
            if t is not None and n not in module._non_persistent_buffers_set
        ]
        if not local:
            continue
        prefix = f"{name}." if name else ""
        tensors.update({prefix + n: t.detach().contiguous() for n, t in local})
        owners.append((prefix, module, hooks[0], [n for n, _ in local]))
    if not owners:
        return
    target = os.path.join(folder, "tlq-packed", f"{os.getpid()}-{next(_packed_ids):05d}.safetensors")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with timed_io(), atomic_file(target, durable=False) as tmp:  # scratch: a crashed run re-packs its layer
        save_file(tensors, tmp)
    store = PackedLayerFile(target)
    for prefix, module, hook, names in owners:
        hook.weights_map = PrefixedDataset(store, prefix)
        hook.offload = hook.offload_buffers = True
        for n in names:
            set_module_tensor_to_device(module, n, "meta")


def _packed_file_hook(module: nn.Module):
    """The accelerate hook of ``module`` that loads it from a :class:`PackedLayerFile`, if any."""
    for hook in all_hooks(module):
        weights = getattr(hook, "weights_map", None)
        if isinstance(weights, PrefixedDataset) and isinstance(weights.dataset, PackedLayerFile):
            return hook
    return None


def with_disk_layers_loaded(model: nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The state dict to save, with every meta entry of a layer kept in ``tlq-packed/`` read back.

    ``state`` (in-memory names) defaults to ``model.state_dict()``; returned unchanged when no layer is kept
    on disk. Saving needs real tensors there: transformers 4.x cannot resolve meta entries whose names it
    renames, and the packed layers are small (about 0.27x the bf16 decoder).
    """
    hooks = {name: h for name, m in model.named_modules() if (h := _packed_file_hook(m)) is not None}
    if not hooks:
        return state
    out = dict(model.state_dict() if state is None else state)
    for key, value in list(out.items()):
        owner, _, local = key.rpartition(".")
        hook = hooks.get(owner)
        if hook is not None and value.device.type == "meta" and _holds(hook.weights_map, local):
            out[key] = hook.weights_map[local]
    return out
