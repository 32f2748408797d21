"""``TLQConfig``: the one object a user passes to ``from_pretrained(..., quantization_config=...)``."""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .act_formats import ACT_FORMATS
from .calibration.importance_kinds import IMPORTANCE_KINDS
from .calibration.offload import CALIBRATION_DTYPES
from .formats.base import FORMATS
from .grids import GRIDS
from .methods import METHODS as METHOD_REGISTRY
from .qtypes import SUPPORTED_ACT_BITS, SUPPORTED_WEIGHT_BITS, QuantScheme
from .solvers import LAYER_SOLVERS
from .version import __version__

__all__ = [
    "TLQConfig",
    "CHOICES",
    "RULES",
    "Rule",
    "SCHEME_FIELDS",
    "field_docs",
    "IMPORTANCE_LABELS",
    "ANSWER_TOKENS",
    "IMPORTANCE_SCOPES",
]

logger = logging.getLogger(__name__)

IMPORTANCE_LABELS = ("gold", "predictive")
ANSWER_TOKENS = ("all", "first")
IMPORTANCE_SCOPES = ("module", "layer")


class _Choices(Mapping[str, tuple]):
    """The allowed values of every enumerated field, read when asked: the registries' names as registered now
    (methods, solvers, importance kinds), so an entry registered after import is accepted like a built-in one."""

    def __init__(self, sources: dict[str, Callable[[], tuple]]) -> None:
        self._sources = sources

    def __getitem__(self, name: str) -> tuple:
        return tuple(self._sources[name]())

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


#: The allowed values of every enumerated field (validation, the command line and its help read them here).
CHOICES: Mapping[str, tuple] = _Choices(
    {
        "bits": lambda: SUPPORTED_WEIGHT_BITS,
        "act_bits": lambda: (None, *(b for b in SUPPORTED_ACT_BITS if b is not None)),
        "grid": GRIDS.names,
        "act_grid": ACT_FORMATS.names,
        "scheme": lambda: (None, *_supported_presets()),
        "method": METHOD_REGISTRY.names,
        "solver": lambda: (None, *LAYER_SOLVERS.names()),
        "importance": lambda: (None, *IMPORTANCE_KINDS.names()),
        "importance_labels": lambda: IMPORTANCE_LABELS,
        "answer_tokens": lambda: ANSWER_TOKENS,
        "importance_scope": lambda: IMPORTANCE_SCOPES,
        "save_format": FORMATS.names,
        "calibration_dtype": lambda: CALIBRATION_DTYPES,
    }
)


def _supported_presets() -> tuple[str, ...]:
    from .ct_schemes import supported_presets  # reads compressed-tensors' presets through our scheme types

    return supported_presets()


#: the fields a compressed-tensors preset name (``TLQConfig(scheme=...)``) sets
SCHEME_FIELDS = ("bits", "group_size", "sym", "act_bits", "grid", "act_grid")


@dataclass(frozen=True)
class Rule:
    """What one ``TLQConfig`` field accepts: a predicate (junk of any type is simply rejected) and the fix (a text,
    or a function giving it when the choices are read from a registry)."""

    check: Callable[[Any], bool]
    hint: str | Callable[[], str]

    @property
    def fix(self) -> str:
        return self.hint() if callable(self.hint) else self.hint

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self.check(value))
        except (TypeError, ValueError, OverflowError):
            return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(field: str) -> Rule:
    """Accepts exactly the current choices of ``field`` (read at each check, as is the fix that names them)."""
    return Rule(
        lambda v: any(v is c or (type(v) is type(c) and v == c) for c in CHOICES[field]),
        lambda: f"one of {CHOICES[field]}",
    )


def _valid_regex(pattern: Any) -> bool:
    try:
        re.compile(pattern.removeprefix("re:"))
    except re.error:
        return False
    return True


def _clip_ok(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_real, v)) and 0 < v[0] <= 1 <= v[1]


def _path_or_none(v: Any) -> bool:
    return v is None or (isinstance(os.fspath(v), str) and bool(os.fspath(v)))


#: Every validated field and what it accepts (``post_init`` checks them in this order).
RULES: dict[str, Rule] = {
    **{name: _one_of(name) for name in CHOICES if name != "scheme"},  # ``scheme`` is an argument, not a field
    "group_size": Rule(
        lambda v: _is_int(v) and (v == -1 or v > 0),
        "a positive integer such as 128 (a divisor "
        "of every quantized layer's in_features) or -1 for one scale per output channel",
    ),
    "sym": Rule(lambda v: isinstance(v, bool), "True or False"),
    "ignore": Rule(
        lambda v: (
            v is None or (isinstance(v, (list, tuple)) and all(isinstance(p, str) and _valid_regex(p) for p in v))
        ),
        "None or a list of valid regex strings, e.g. ['re:.*visual.*']",
    ),
    "num_samples": Rule(lambda v: _is_int(v) and v > 0, "a positive integer, e.g. 128"),
    "max_length": Rule(lambda v: v is None or (_is_int(v) and v > 1), "None or an integer > 1, e.g. 2048"),
    "seed": Rule(lambda v: _is_int(v) and 0 <= v < 2**63, "a non-negative integer"),
    "gamma": Rule(lambda v: _is_real(v) and v > 0, "a positive finite exponent (0.5 tempers, 1 keeps raw)"),
    "importance_clip": Rule(_clip_ok, "(lo, hi) with 0 < lo <= 1 <= hi, both finite"),
    "uniform_mix": Rule(lambda v: _is_real(v) and 0 <= v <= 1, "a value in [0, 1]"),
    "importance_topk": Rule(lambda v: _is_int(v) and 1 <= v <= 64, "an integer in [1, 64], e.g. 4"),
    "token_fraction": Rule(lambda v: _is_real(v) and 0 < v <= 1, "a value in (0, 1]"),
    "exposed": Rule(lambda v: v is None or isinstance(v, bool), "True, False or None (the method's default)"),
    "damp": Rule(lambda v: _is_real(v) and 0 <= v < 1, "a small fraction such as 0.01"),
    "act_order": Rule(lambda v: isinstance(v, bool), "True or False"),
    "smooth_alpha": Rule(lambda v: _is_real(v) and 0 <= v <= 1, "a value in [0, 1]"),
    "expert_min_tokens": Rule(lambda v: _is_int(v) and v >= 0, "a non-negative integer, e.g. 32"),
    "expert_all_tokens": Rule(lambda v: isinstance(v, bool), "True or False"),
    "offload_dir": Rule(_path_or_none, "None or a folder path"),
    "checkpoint_dir": Rule(_path_or_none, "None or a folder path"),
}


_SERIALIZED = (
    "bits",
    "group_size",
    "sym",
    "act_bits",
    "grid",
    "act_grid",
    "method",
    "ignore",
    "save_format",
    "num_samples",
    "max_length",
    "seed",
    "importance",
    "gamma",
    "importance_clip",
    "uniform_mix",
    "importance_labels",
    "importance_topk",
    "answer_tokens",
    "importance_scope",
    "token_fraction",
    "exposed",
    "solver",
    "damp",
    "act_order",
    "smooth_alpha",
    "expert_min_tokens",
    "expert_all_tokens",
    "calibration_dtype",
)


def field_docs() -> dict[str, str]:
    """Each ``TLQConfig`` argument's description, from the class docstring's ``Args:`` section (an entry
    ``a, b: text`` documents both fields), whitespace collapsed."""
    doc = TLQConfig.__doc__ or ""
    body = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in body.splitlines():
        head = re.match(r"^ {8}([a-z_]+(?:, [a-z_]+)*): (.*)$", line)
        if head:
            names = head.group(1).split(", ")
            for name in names:
                docs[name] = head.group(2).strip()
        elif line.strip() and names:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


class TLQConfig(QuantizationConfigMixin):
    """Configuration of TLQ quantization.

    Args:
        scheme: a compressed-tensors preset name (``"W4A16"``, ``"W8A8"``, ``"FP8_DYNAMIC"``, ``"NVFP4A16"``,
            ``"NVFP4"``, ``"MXFP4A16"``, ...) setting ``bits``, ``group_size``, ``sym``, ``act_bits``, ``grid`` and
            ``act_grid`` at once; a field also given must agree with it. Never serialised (the fields are).
        bits: weight bits, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale (a divisor of every quantized layer's
            ``in_features``), or -1 for one scale per output channel.
        sym: symmetric (zero point 0) or asymmetric weight quantization.
        act_bits: ``None`` for weight-only, 8 for dynamic per-token int8 (W8A8, W4A8) or FP8 (``act_grid="fp8"``)
            activations, 4 for NVFP4 activations (``act_grid="nvfp4"``).
        grid: the values a weight element takes: ``"int"`` (default), ``"fp8"`` (E4M3, per channel or group),
            ``"nvfp4"`` (E2M1, groups of 16, E4M3 scales and a float32 global scale) or ``"mxfp4"`` (E2M1, groups of
            32, power-of-two E8M0 scales).
        act_grid: the activation format with ``act_bits``: ``"int"`` (per-token int8), ``"fp8"`` (per-token E4M3)
            or ``"nvfp4"`` (groups of 16 under a per-layer global scale calibrated on the calibration inputs).
        method: ``"tlq"`` (gradient token importance + token-level calibration set + quantization-exposed
            layer-wise solver), or a baseline through the same pipeline: ``"gptq"``, ``"gptaq"`` (asymmetric
            GPTQ, uniform weights), ``"awq"``, ``"mbq"``
            (modality-balanced weights, AWQ solver), ``"smoothquant"`` (migration + RTN), ``"rtn"``
            (round-to-nearest, no data). Every method but ``"rtn"`` needs ``dataset``.
        ignore: regexes (an optional ``re:`` prefix is accepted) of module names to keep in full
            precision. ``None`` (default) quantizes exactly the linear layers of the language-model
            decoder, keeping the vision tower, the projector and ``lm_head`` in full precision.
            With a list, every ``nn.Linear`` not matched is quantized.
        save_format: ``"compressed-tensors"`` (default; reloads without tlq_hf, loads in vLLM) or
            ``"tlq"`` (native packed modules, reloads only with ``import tlq_hf``).
        dataset: calibration rows (list of dicts, ``datasets.Dataset``, local folder or Hub id; see
            :mod:`tlq_hf.data`). Never serialised.
        processor: the processor to encode ``dataset``; default: loaded from the model's own path.
        num_samples, max_length, seed: how many rows (seeded shuffle), token cap per sample.
        importance: per-token weights, ``"fisher"`` (squared output gradient), ``"l1"``, ``"uniform"`` or
            ``"modality"`` (MBQ per-modality mean); ``None`` = the method's default.
        gamma, importance_clip, uniform_mix: tempering ``a <- (1-mix) * clip((a/mean a)^gamma, lo, hi) + mix``.
        importance_labels: the answer labels the gradients are taken at: ``"gold"`` (the dataset's answers, the
            empirical Fisher) or ``"predictive"`` (the full-precision model's own distribution: the expectation
            over its ``importance_topk`` most likely tokens at each answer position, weighted by their
            renormalised probabilities; one extra backward per label, so about ``importance_topk`` x the
            gradient pass's backward time).
        importance_topk: how many of the full-precision model's most likely tokens the predictive labels use.
        answer_tokens: ``"all"`` answer tokens carry the loss, or only the ``"first"`` of each answer.
        importance_scope: weights from each module group's own output gradient (``"module"``) or from the
            decoder layer's output gradient, shared by all of the layer's modules (``"layer"``).
        token_fraction: keep only this fraction of the most important tokens in the statistics.
        exposed: calibrate layer ``l`` on the outputs of the already-quantized layers (``None`` = method default).
        solver: ``"gptq"``, ``"gptaq"`` (asymmetric GPTQ: the full-precision output is the target of the
            exposed input), ``"awq"`` or ``"rtn"`` for ``method="tlq"`` (``None`` = ``"gptq"``).
        damp, act_order: GPTQ damping (fraction of the mean Hessian diagonal) and column order (``True``:
            columns by decreasing Hessian diagonal with static groups, as llm-compressor's default; no
            ``g_idx`` needed in the checkpoint).
        smooth_alpha: SmoothQuant migration strength.
        expert_min_tokens: MoE experts: an expert projection whose input received fewer calibration tokens
            than this is rounded to nearest (RTN) instead of solved on too little data; the report lists
            tokens per expert and every projection that fell back.
        expert_all_tokens: MoE experts: collect every expert's statistics from every token (the forward keeps
            the router's choice), as llm-compressor's ``calibrate_all_experts``; ``False`` (default): each
            expert is calibrated on the tokens its router sends it.
        calibration_dtype: the dtype half-precision layers compute in while calibrating: ``"auto"`` (default)
            their own dtype where the device has native matmuls for it (GPUs; bfloat16 on a CPU with AVX512-BF16
            or AMX, about 4x float32's speed there), float32 elsewhere; ``"float32"`` always upcasts (slower,
            the statistics see float32 forwards). Statistics, solves and errors are float32 either way.
        offload_dir: folder for calibration activations (layer boundaries, gradients, targets), one file
            per sample, so host memory holds one layer's worth; ``None`` keeps them in host memory.
            Never serialised.
        checkpoint_dir: folder for per-layer calibration checkpoints; a run restarted with the same model,
            data and config skips the layers already finished there. Never serialised.
    """

    # one keyword argument per field, as transformers' quantization configs take them (documented above)
    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        act_bits: int | None = None,
        method: str = "tlq",
        ignore: list[str] | None = None,
        save_format: str = "compressed-tensors",
        dataset: Any = None,
        processor: Any = None,
        num_samples: int = 128,
        max_length: int | None = 2048,
        seed: int = 0,
        importance: str | None = None,
        gamma: float = 1.0,
        importance_clip: tuple[float, float] | list[float] = (0.05, 20.0),
        uniform_mix: float = 0.0,
        importance_labels: str = "gold",
        importance_topk: int = 4,
        answer_tokens: str = "all",
        importance_scope: str = "module",
        token_fraction: float = 1.0,
        exposed: bool | None = None,
        solver: str | None = None,
        damp: float = 0.01,
        act_order: bool = True,
        smooth_alpha: float = 0.5,
        expert_min_tokens: int = 32,
        expert_all_tokens: bool = False,
        calibration_dtype: str = "auto",
        grid: str = "int",
        act_grid: str = "int",
        scheme: str | None = None,
        offload_dir: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = "tlq"
        kwargs.pop("quant_method", None)
        self.tlq_version = kwargs.pop("tlq_version", __version__)
        if kwargs:
            raise TypeError(
                f"TLQConfig got unknown argument(s) {sorted(kwargs)}; valid ones are "
                f"{[*_SERIALIZED, 'scheme', 'dataset', 'processor', 'offload_dir', 'checkpoint_dir']}."
            )
        self.bits, self.group_size, self.sym, self.act_bits = bits, group_size, sym, act_bits
        self.grid, self.act_grid = grid, act_grid
        if scheme is not None:
            self._apply_preset(scheme)
        self.method, self.ignore, self.save_format = method, ignore, save_format
        self.dataset, self.processor = dataset, processor
        self.num_samples, self.max_length, self.seed = num_samples, max_length, seed
        self.importance, self.gamma, self.importance_clip = importance, gamma, importance_clip
        self.uniform_mix, self.token_fraction, self.exposed, self.solver = uniform_mix, token_fraction, exposed, solver
        self.importance_labels, self.importance_topk = importance_labels, importance_topk
        self.answer_tokens, self.importance_scope = answer_tokens, importance_scope
        self.damp, self.act_order, self.smooth_alpha = damp, act_order, smooth_alpha
        self.expert_min_tokens, self.expert_all_tokens = expert_min_tokens, expert_all_tokens
        self.calibration_dtype = calibration_dtype
        self.offload_dir, self.checkpoint_dir = offload_dir, checkpoint_dir
        self.post_init()
        self.offload_dir = os.fspath(offload_dir) if offload_dir is not None else None
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None

    def _apply_preset(self, name: str) -> None:
        """Set :data:`SCHEME_FIELDS` from compressed-tensors preset ``name``; a field given with another value than
        both its default and the preset's is a contradiction, refused naming both."""
        if not isinstance(name, str):
            raise ValueError(f"TLQConfig(scheme={name!r}): use {_one_of('scheme').fix}.")
        from .ct_schemes import preset_scheme

        try:
            preset = preset_scheme(name)
        except ValueError as err:
            raise ValueError(f"TLQConfig: {err}") from None
        defaults = inspect.signature(TLQConfig.__init__).parameters
        for field in SCHEME_FIELDS:
            given, wanted = getattr(self, field), getattr(preset, field)
            if given != defaults[field].default and given != wanted:
                raise ValueError(
                    f"TLQConfig(scheme={name!r}, {field}={given!r}): the preset sets {field}={wanted!r}; drop "
                    f"{field}=... or the scheme."
                )
            setattr(self, field, wanted)

    def post_init(self) -> None:
        """Validate every field against :data:`RULES`; an error names the field, the value and the fix."""
        for name, rule in RULES.items():
            value = getattr(self, name)
            if not rule.accepts(value):
                raise ValueError(f"TLQConfig({name}={value!r}): use {rule.fix}.")
        try:
            self.scheme  # noqa: B018  (the fields together: a grid's bits, an activation format's act_bits, ...)
        except ValueError as err:
            raise ValueError(f"TLQConfig: {err}") from None
        FORMATS[self.save_format].check_config(self)
        self.importance_clip = [float(v) for v in self.importance_clip]
        if self.ignore is not None:
            self.ignore = list(self.ignore)

    def __deepcopy__(self, memo: dict) -> TLQConfig:
        """Copies the settings; the dataset and processor are shared, never copied (they can be large)."""
        import copy

        new = copy.copy(self)
        for key in _SERIALIZED:
            setattr(new, key, copy.deepcopy(getattr(self, key), memo))
        return new

    @property
    def needs_data(self) -> bool:
        """Whether the run reads calibration data (``dataset``): every method but round-to-nearest does, and every
        method does for activations with a calibrated global scale (NVFP4 activations)."""
        return METHOD_REGISTRY[self.method].needs_data or self.scheme.calibrated_activations

    @property
    def scheme(self) -> QuantScheme:
        """The weight/activation scheme these fields describe."""
        return QuantScheme(**{field: getattr(self, field) for field in SCHEME_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields only (what goes into ``config.json``)."""
        out = {"quant_method": "tlq", "tlq_version": self.tlq_version}
        out.update({k: getattr(self, k) for k in _SERIALIZED})
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a ``config.json`` dict; keys this version does not know are dropped with a warning."""
        known = {k: v for k, v in config_dict.items() if k in _SERIALIZED + ("tlq_version",)}
        unknown = sorted(set(config_dict) - set(known) - {"quant_method"})
        if unknown:
            logger.warning("TLQConfig.from_dict: ignoring keys unknown to tlq_hf %s: %s", __version__, unknown)
        config = cls(**known)
        unused = {}
        for key, value in kwargs.items():
            if key in _SERIALIZED:
                setattr(config, key, value)
            else:
                unused[key] = value
        config.post_init()
        return (config, unused) if return_unused_kwargs else config
