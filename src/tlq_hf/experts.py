"""Mixture-of-experts decoders: fused experts become one ``nn.Linear`` per expert projection.

transformers stores the experts of an MoE layer as one module with fused 3-D parameters: ``gate_up_proj``
``[E, 2I, H]`` (or ``up_proj [E, I, H]`` without a gate) and ``down_proj [E, H, I]``, transposed to
``[E, in, out]`` where the model says so. Every calibration method here works on linears, so before
calibration each fused experts module is replaced by :class:`UnfusedExperts`: children ``0 .. E-1``, each
an :class:`ExpertMLP` with ``gate_proj`` / ``up_proj`` / ``down_proj`` linears holding exactly the fused
slices, and a forward that computes what the fused module computes (same routing, same gating function,
same routing weights; float32 accumulation). The names are the per-expert names of the original checkpoints
and of vLLM's MoE loaders (``mlp.experts.3.gate_proj``), so a quantized checkpoint is written under them.

How a fused module is called differs between model families; each way is an :class:`ExpertsConvention`
in :data:`CONVENTIONS`:

* ``"experts-interface"``: every module decorated with transformers' ``use_experts_implementation``
  (``transformers.integrations.moe``; Qwen3-VL-MoE, Qwen3.5-MoE, DeepSeek-V3 / Kimi, GLM-4.5V, ERNIE-4.5-VL,
  GPT-OSS and 60+ more), found by the attributes the decorator sets; called as
  ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``.
* ``"llama4"`` (per-model: Llama 4's ``Llama4TextExperts`` does not use the interface): called with every
  token sent to every expert, pre-scaled by its router score (0 for experts the token is not routed to),
  ``routed_in [E * N, H]``; the tokens an expert really receives are the rows that are not zero.

Statistics see each expert's own tokens: while an expert runs, :func:`routed_tokens` gives the positions
(in the flattened ``[N]`` tokens of the call) of the rows it receives, so a token's importance weight
follows it into whichever expert it reaches. Under :func:`every_token_to_every_expert` each expert also
runs on all ``N`` tokens (for statistics; the output keeps the real routing).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "CONVENTIONS",
    "ExpertMLP",
    "ExpertsConvention",
    "ExpertsLayout",
    "UnfusedExperts",
    "convention_of",
    "every_token_to_every_expert",
    "only_experts",
    "experts_clock",
    "expert_index",
    "expert_tensors",
    "expert_owner",
    "register_convention",
    "routed_tokens",
    "unfuse_experts",
]

logger = logging.getLogger(__name__)

_ROUTED: ContextVar[torch.Tensor | None] = ContextVar("tlq_routed_tokens", default=None)
_EVERY_TOKEN: ContextVar[bool] = ContextVar("tlq_every_token", default=False)
_ONLY: ContextVar[tuple[nn.Module, frozenset[int]] | None] = ContextVar("tlq_only_experts", default=None)


def routed_tokens() -> torch.Tensor | None:
    """Positions ``[n]`` (into the ``N`` tokens of the current experts call) of the rows the expert now running
    receives; ``None`` outside an expert."""
    return _ROUTED.get()


@contextlib.contextmanager
def every_token_to_every_expert(on: bool = True) -> Iterator[None]:
    """Within this context every expert of an :class:`UnfusedExperts` also runs on every token of each call
    (what the statistics hooks see); each call's output still uses the router's choice."""
    token = _EVERY_TOKEN.set(on)
    try:
        yield
    finally:
        _EVERY_TOKEN.reset(token)


class _Clock:
    seconds = 0.0


@contextlib.contextmanager
def experts_clock(root: nn.Module) -> Iterator[_Clock]:
    """``clock.seconds``: wall time spent inside the :class:`UnfusedExperts` modules under ``root`` while the
    context is open (their forwards, hooks on their linears included)."""
    clock, started = _Clock(), {}

    def pre(module: nn.Module, args: tuple) -> None:
        started[id(module)] = time.perf_counter()

    def post(module: nn.Module, args: tuple, out: object) -> None:
        clock.seconds += time.perf_counter() - started.pop(id(module))

    handles = []
    for module in root.modules():
        if isinstance(module, UnfusedExperts):
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield clock
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def only_experts(experts: nn.Module, chosen: set[int]) -> Iterator[None]:
    """Within this context the :class:`UnfusedExperts` ``experts`` runs only the experts in ``chosen``; the others
    add nothing to its output. For forwards whose output is discarded and that read only the chosen experts'
    inputs (a statistics pass over some experts of a layer)."""
    token = _ONLY.set((experts, frozenset(chosen)))
    try:
        yield
    finally:
        _ONLY.reset(token)


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights."""

    num_experts: int
    has_gate: bool  # gate_up_proj (gate and up fused) or up_proj alone
    transposed: bool  # stored [E, in, out] instead of [E, out, in]
    concatenated: bool  # [gate; up] halves, or interleaved gate0, up0, gate1, ...
    has_bias: bool

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    @property
    def fused_names(self) -> tuple[str, ...]:
        """The fused module's parameters holding expert weights (each ``[E, ...]``)."""
        names = (self.up_name, "down_proj")
        return names + tuple(f"{n}_bias" for n in names) if self.has_bias else names

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up parts of one expert's fused ``gate_up`` rows (weight ``[2I, H]`` or bias ``[2I]``)."""
        if self.concatenated:
            half = fused.shape[0] // 2
            return fused[:half], fused[half:]
        return fused[0::2], fused[1::2]


def expert_tensors(layout: ExpertsLayout, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One expert's per-expert parameters (``"gate_proj.weight"``, ``"up_proj.weight"``, ``"down_proj.weight"``,
    and ``.bias`` where the layout has biases), as views of its slices of the fused tensors ``fused``
    (``{"gate_up_proj": [2I, H] or [H, 2I] when transposed, "down_proj": ..., "gate_up_proj_bias": ..., ...}``,
    the fused module's parameter names with the expert dimension indexed away)."""
    out: dict[str, torch.Tensor] = {}
    for suffix in ("", "_bias") if layout.has_bias else ("",):
        attr = "bias" if suffix else "weight"
        up, down = fused[layout.up_name + suffix], fused["down_proj" + suffix]
        if not suffix and layout.transposed:
            up, down = up.t(), down.t()
        if layout.has_gate:
            out[f"gate_proj.{attr}"], out[f"up_proj.{attr}"] = layout.split(up)
        else:
            out[f"up_proj.{attr}"] = up
        out[f"down_proj.{attr}"] = down
    return out


class ExpertsConvention(ABC):
    """One way transformers models store and call fused experts."""

    name: str

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a fused experts module of this convention."""

    @abstractmethod
    def layout(self, module: nn.Module) -> ExpertsLayout:
        """How ``module`` (one that :meth:`matches`) stores its weights."""

    @abstractmethod
    def forward(self, experts: UnfusedExperts, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """What the fused module's forward returns, computed with ``experts``' per-expert linears."""


CONVENTIONS: dict[str, ExpertsConvention] = {}


def register_convention(cls: type[ExpertsConvention]) -> type[ExpertsConvention]:
    """Class decorator: make an instance of ``cls`` available under ``cls.name``."""
    CONVENTIONS[cls.name] = cls()
    return cls


def convention_of(module: nn.Module) -> ExpertsConvention | None:
    """The convention of a fused experts module (``None``: not a fused experts module tlq_hf knows)."""
    if isinstance(module, UnfusedExperts):
        return None
    return next((c for c in CONVENTIONS.values() if c.matches(module)), None)


def _param3(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return isinstance(p, torch.Tensor) and p.ndim == 3


@register_convention
class InterfaceExperts(ExpertsConvention):
    """transformers' ``use_experts_implementation`` modules (``transformers.integrations.moe``)."""

    name = "experts-interface"
    _ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "num_experts")

    def matches(self, module: nn.Module) -> bool:
        if not all(hasattr(module, a) for a in self._ATTRS):
            return False
        return _param3(module, "down_proj") and _param3(module, "gate_up_proj" if module.has_gate else "up_proj")

    def layout(self, module: nn.Module) -> ExpertsLayout:
        return ExpertsLayout(
            int(module.num_experts),
            bool(module.has_gate),
            bool(module.is_transposed),
            bool(module.is_concatenated),
            bool(module.has_bias),
        )

    def forward(self, experts: UnfusedExperts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        hidden = hidden_states
        n, k = top_k_index.shape
        flat_e = top_k_index.reshape(-1)
        flat_w = top_k_weights.reshape(-1)
        token = torch.arange(n, device=hidden.device).repeat_interleave(k)
        out = torch.zeros(n, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        hit = torch.unique(flat_e).tolist()
        every = _EVERY_TOKEN.get()
        for e in range(len(experts)) if every else hit:
            if e < 0 or e >= len(experts) or experts.skips(e):  # expert-parallel sentinels: not on this rank
                continue
            sel = flat_e == e
            idx = token[sel]
            if every:
                y = experts.run(e, hidden, torch.arange(n, device=hidden.device))[idx]
            elif idx.numel():
                y = experts.run(e, hidden, idx)
            else:
                continue
            out.index_add_(0, idx, y.float() * flat_w[sel, None].float())
        return out.to(hidden.dtype)


@register_convention
class Llama4Experts(ExpertsConvention):
    """Llama 4's ``Llama4TextExperts`` (per-model: it does not use the experts interface)."""

    name = "llama4"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Llama4TextExperts" and _param3(module, "gate_up_proj")

    def layout(self, module: nn.Module) -> ExpertsLayout:
        return ExpertsLayout(int(module.num_experts), True, True, True, False)

    def forward(self, experts: UnfusedExperts, hidden_states) -> torch.Tensor:
        routed_in = hidden_states
        e_count = len(experts)
        x = routed_in.view(e_count, -1, routed_in.shape[-1])
        out = torch.zeros_like(x)
        every = _EVERY_TOKEN.get()
        for e in range(e_count):
            if experts.skips(e):
                continue
            idx = (x[e] != 0).any(-1).nonzero().flatten()  # tokens routed here: their rows are not zero
            if every:
                out[e] = experts.run(e, x[e], torch.arange(x.shape[1], device=x.device)).to(out.dtype)
                continue
            if idx.numel():
                out[e, idx] = experts.run(e, x[e], idx).to(out.dtype)
        return out.view(-1, routed_in.shape[-1])


class ExpertMLP(nn.Module):
    """One expert: ``down(gate_fn([gate(x), up(x)]))`` (``act(up(x))`` without a gate)."""

    def __init__(self, hidden: int, intermediate: int, has_gate: bool, bias: bool) -> None:
        super().__init__()
        if has_gate:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)


class UnfusedExperts(nn.Module):
    """A fused experts module as ``E`` :class:`ExpertMLP` children named ``0 .. E-1`` (same call, same output).

    The gating function, activation and any other non-weight attribute the fused module's ``_apply_gate`` reads
    come from a parameter-free copy of it; a ``post_expert_norm`` is kept as a child.
    """

    def __init__(self, fused: nn.Module, convention: ExpertsConvention, copy_weights: bool = True) -> None:
        super().__init__()
        layout = convention.layout(fused)
        self.layout, self.convention = layout, convention
        down = fused.down_proj
        hidden, inter = (down.shape[2], down.shape[1]) if layout.transposed else (down.shape[1], down.shape[2])
        device = down.device
        for e in range(layout.num_experts):
            with torch.device(device):
                mlp = ExpertMLP(hidden, inter, layout.has_gate, layout.has_bias).to(down.dtype)
            self.add_module(str(e), mlp)
        if copy_weights and device.type != "meta":
            self._copy_from(fused)
        shell = copy.copy(fused)  # the gating function's attributes, without the weights
        shell._parameters, shell._buffers = {}, {}
        shell._modules = {k: m for k, m in fused._modules.items() if not list(m.parameters())}
        object.__setattr__(self, "_shell", shell)
        if getattr(fused, "has_post_expert_norm", False):
            self.post_expert_norm = fused.post_expert_norm
        self.num_experts = layout.num_experts  # the attribute routers are recognised by (arch.kept_by_role)

    @torch.no_grad()
    def _copy_from(self, fused: nn.Module) -> None:
        for e in range(self.layout.num_experts):
            mlp = self.expert(e)
            for key, value in expert_tensors(
                self.layout, {n: getattr(fused, n)[e] for n in self.layout.fused_names}
            ).items():
                mlp.get_parameter(key).copy_(value)

    def __len__(self) -> int:
        return self.layout.num_experts

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def skips(self, e: int) -> bool:
        """Whether expert ``e`` is left out of this call (:func:`only_experts`)."""
        only = _ONLY.get()
        return only is not None and only[0] is self and e not in only[1]

    def run(self, e: int, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``hidden[idx]`` (:func:`routed_tokens` gives ``idx`` meanwhile)."""
        mlp, layout = self.expert(e), self.layout
        x = hidden[idx]
        token = _ROUTED.set(idx)
        try:
            if layout.has_gate:
                g, u = mlp.gate_proj(x), mlp.up_proj(x)
                gu = torch.cat([g, u], -1) if layout.concatenated else torch.stack([g, u], -1).flatten(-2)
                apply_gate = getattr(self._shell, "_apply_gate", None)
                if apply_gate is not None:
                    h = apply_gate(gu)
                else:  # Llama 4: gate and up halves, act(gate) * up
                    h = self._shell.act_fn(g) * u
            else:
                h = self._shell.act_fn(mlp.up_proj(x))
            y = mlp.down_proj(h)
        finally:
            _ROUTED.reset(token)
        if getattr(self, "post_expert_norm", None) is not None:
            y = self.post_expert_norm(y)
        return y

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.convention.forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_experts={len(self)}, convention={self.convention.name!r}"


def unfuse_experts(
    model: nn.Module,
    root: str,
    swap: Callable[[str, nn.Module], None],
    copy_weights: bool = True,
    offloaded: Callable[[nn.Module, UnfusedExperts], None] | None = None,
) -> list[str]:
    """Replace every fused experts module under ``root`` (dotted path; ``""``: the whole model) by an
    :class:`UnfusedExperts`, through ``swap(name, module)``; returns their names.

    ``copy_weights=False`` builds the per-expert linears empty (on the fused weights' device, e.g. ``meta``
    before a checkpoint is loaded into them). A fused module whose weights are offloaded (``meta``, loaded by
    its accelerate hook per forward) gets per-expert linears on ``meta`` too, and ``offloaded(fused, unfused)``
    gives them their weights' source (e.g. :func:`tlq_hf.calibration.offload.offload_unfused_experts`); without
    it such a module is refused.
    """
    base = model.get_submodule(root) if root else model
    found = []
    for name, module in list(base.named_modules()):
        convention = convention_of(module)
        if convention is None:
            continue
        full = f"{root}.{name}" if root else name
        on_meta = module.down_proj.device.type == "meta"
        if copy_weights and on_meta and offloaded is None:
            raise ValueError(
                f"{full}: the experts' weights are offloaded (meta tensors) and nothing says where to read each "
                "expert from: load with device_map='cpu', or quantize through TLQConfig / tlq_hf.quantize, which "
                "read offloaded experts one at a time."
            )
        unfused = UnfusedExperts(module, convention, copy_weights=copy_weights and not on_meta)
        if copy_weights and on_meta:
            offloaded(module, unfused)
        found.append(full)
        swap(full, unfused)
    if found:
        logger.info("tlq_hf: %d fused experts modules as per-expert linears (%s)", len(found), found[0])
    return found


_EXPERT_LINEAR = re.compile(r"^(?P<owner>.+)\.(?P<expert>\d+)\.(?:gate_proj|up_proj|down_proj)$")


def expert_index(name: str, model: nn.Module) -> tuple[str, int] | None:
    """``(experts module name, expert number)`` if ``name`` is a projection of an :class:`UnfusedExperts` expert."""
    match = _EXPERT_LINEAR.match(name)
    if match is None:
        return None
    try:
        owner = model.get_submodule(match["owner"])
    except AttributeError:
        return None
    return (match["owner"], int(match["expert"])) if isinstance(owner, UnfusedExperts) else None


def expert_owner(name: str, model: nn.Module) -> str | None:
    """The name of the :class:`UnfusedExperts` that the linear called ``name`` is an expert projection of."""
    found = expert_index(name, model)
    return found[0] if found is not None else None
