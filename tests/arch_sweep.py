"""Every image-text-to-text architecture of the installed transformers, shrunk from its config class's own
defaults, quantized on load, saved and reloaded without tlq_hf (``tests/test_arch_sweep.py``,
``benchmarks/support_table.py``).

Shrinking is generic, never per model: each (sub-)config's depth goes to 2 text layers / 1 vision layer, the
text decoder's widths to :data:`TEXT`, expert counts to 4 (top-2), lists indexed by layer are cut to the new
depth, and every other integer that equalled the text decoder's original width (projector outputs such as
``out_hidden_size``) follows it. An architecture whose shrunk config does not build is reported as not
buildable, with the error.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

try:  # transformers 5 renamed the auto mapping's class; the names mapping is the same on both lines
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as _NAMES
except ImportError:  # pragma: no cover
    _NAMES = {}

#: The shrunk text decoder, under every name configs use for each width (two heads keep a derived head
#: dimension at 128, the one rotary sections such as Qwen2-VL's mrope are written for).
_TEXT_WIDTH, _TOWER_WIDTH = 256, 64
_WIDTH_KEYS = ("hidden_size", "d_model", "embed_dim", "n_embd")
_FFN_KEYS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim")
_HEAD_KEYS = ("num_attention_heads", "attention_heads", "num_heads", "n_head", "encoder_attention_heads")
_HEAD_KEYS += ("decoder_attention_heads",)
TEXT = {
    **dict.fromkeys(_WIDTH_KEYS, _TEXT_WIDTH),
    **dict.fromkeys(_FFN_KEYS, 2 * _TEXT_WIDTH),
    **dict.fromkeys(_HEAD_KEYS, 2),
    "num_key_value_heads": 1,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
    "moe_shared_expert_intermediate_size": 128,
}
#: Every other (sub-)config (vision, audio, projector towers): one layer of this width.
TOWER = {
    **dict.fromkeys(_WIDTH_KEYS, _TOWER_WIDTH),
    **dict.fromkeys(_FFN_KEYS, 2 * _TOWER_WIDTH),
    **dict.fromkeys(_HEAD_KEYS, 4),
    "head_dim": 16,
}
#: Vocabularies above this are cut to it; token ids past it move to its top (text inputs never use them).
VOCAB = 4096
_DEPTH_KEYS = ("num_hidden_layers", "num_layers", "depth", "n_layers", "n_layer", "layers", "encoder_layers")
_DEPTH_KEYS += ("decoder_layers", "num_decoder_layers")
_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk")
_TEXT_KEYS = ("text_config", "language_config", "llm_config", "text_model_config")


def architectures() -> dict[str, str]:
    """``{model_type: model class name}`` of the installed transformers' image-text-to-text auto mapping."""
    return dict(_NAMES)


def _sub_configs(config: PretrainedConfig) -> dict[str, PretrainedConfig]:
    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    for key in _TEXT_KEYS:
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            return sub
    return config


def _cut_layer_lists(cfg: PretrainedConfig, depth: int) -> None:
    for key, value in list(vars(cfg).items()):
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per-layer settings
            setattr(cfg, key, {k: v for k, v in value.items() if int(k) < depth})
            continue
        if not isinstance(value, list) or not value:
            continue
        if key in ("layer_types", "mlp_layer_types", "block_types") or key.endswith("_layer_types"):
            kinds = list(dict.fromkeys(value))  # one layer of each kind, in order (a hybrid keeps attention)
            setattr(cfg, key, kinds[:depth] + value[len(kinds) : len(kinds) + depth - len(kinds[:depth])])
        elif "index" in key or key.endswith(("_layers", "_layer_ids", "_indexes", "_indices")):
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                setattr(cfg, key, [v for v in value if 0 <= v < depth] or [depth - 1])


def _shrink_depth(cfg: PretrainedConfig, depth: int) -> None:
    for key in _DEPTH_KEYS:
        if (_int(cfg, key) or 0) > depth:
            setattr(cfg, key, depth)
    _cut_layer_lists(cfg, depth)
    per_layer = cfg.to_dict().get("per_layer_config")  # transformers' heterogeneous configs: overrides by layer
    if per_layer:
        cfg.per_layer_config = {int(k): v for k, v in per_layer.items() if int(k) < depth}


def _remap(cfg: PretrainedConfig, old: int, new: int, skip: PretrainedConfig, seen: set[int]) -> None:
    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    for key, value in list(vars(cfg).items()):
        if isinstance(value, PretrainedConfig):
            _remap(value, old, new, skip, seen)
        elif cfg is not skip and value == old and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, key, new)


def _width(cfg: PretrainedConfig) -> int | None:
    return next((w for k in _WIDTH_KEYS if (w := _int(cfg, k)) is not None), None)


def _shrink_vocab(root: PretrainedConfig, cfg: PretrainedConfig) -> None:
    old = _int(cfg, "vocab_size")
    if old is None or old <= VOCAB:
        return
    _remap(root, old, VOCAB, None, set())  # vocab_size and its copies (per-layer input vocabularies)
    ids: set[int] = set()
    nodes = [root]
    while nodes:
        node = nodes.pop()
        nodes += _sub_configs(node).values()
        for key, value in vars(node).items():
            if key.endswith(("_id", "_index", "_ids")):
                values = value if isinstance(value, list) else [value]
                ids |= {v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= VOCAB}
    moved = {v: VOCAB - 1 - i for i, v in enumerate(sorted(ids))}
    nodes = [root]
    while nodes:
        node = nodes.pop()
        nodes += _sub_configs(node).values()
        for key, value in list(vars(node).items()):
            if key.endswith(("_id", "_index", "_ids")):
                if isinstance(value, list):
                    setattr(node, key, [moved.get(v, v) if isinstance(v, int) else v for v in value])
                elif isinstance(value, int) and not isinstance(value, bool) and value in moved:
                    setattr(node, key, moved[value])


def _int(cfg: PretrainedConfig, key: str) -> int | None:
    """``cfg.key`` if it is stored on ``cfg`` as an int (read from the instance: some configs refuse a global
    read of a per-layer attribute)."""
    value = vars(cfg).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _set_widths(cfg: PretrainedConfig, widths: dict[str, int]) -> None:
    for key, value in widths.items():
        if _int(cfg, key) is not None:
            setattr(cfg, key, value)


def _shrink_node(config: PretrainedConfig, root: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    text = _text_config(config)
    subs = _sub_configs(config)
    for cfg in [config, *subs.values()]:
        _shrink_depth(cfg, 2 if cfg is text or cfg is config else 1)
    # the text decoder first (projector outputs follow its width), then every tower (projector inputs follow)
    towers = [text] + [c for c in subs.values() if c is not text and not _sub_configs(c)]
    for cfg in towers:
        old = _width(cfg)
        _set_widths(cfg, TEXT if cfg is text else TOWER)
        if cfg is text:
            for keys, cap in ((_EXPERT_KEYS, 4), (_TOP_K_KEYS, 2)):
                for key in keys:
                    if (_int(cfg, key) or 0) > cap:
                        setattr(cfg, key, cap)
        new = _width(cfg)
        if old is not None and new is not None and old != new:
            _remap(root, old, new, cfg, set())
    _shrink_vocab(root, text)
    for sub in subs.values():  # nested models (a VLM inside a policy model, an encoder-decoder's halves)
        if _sub_configs(sub):
            _shrink_node(sub, root, seen)


def shrink(config: PretrainedConfig) -> PretrainedConfig:
    """A small copy of ``config`` (see the module docstring)."""
    config = copy.deepcopy(config)
    _shrink_node(config, config, set())
    return config


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``model_type``'s image-text-to-text class, float32, in eval mode."""
    config = shrink(AutoConfig.for_model(model_type))
    cls = getattr(transformers, _NAMES[model_type])
    torch.manual_seed(seed)
    return cls._from_config(config, dtype=torch.float32).eval()


@dataclass
class SweepRow:
    """One architecture's outcome: ``status`` is ``supported``, ``unsupported`` (refused before any weight
    changed, ``reason`` the error) or ``not buildable`` (its shrunk config does not build)."""

    model_type: str
    model_class: str
    status: str
    reason: str = ""
    quantized: int = 0  # decoder weights quantized / total decoder weights
    total: int = 0
    max_logit_diff: float | None = None
    seconds: float = 0.0  # build, save, quantize on load, save (the reload runs in one interpreter for all)
    reload: str = "transformers"  # or "import tlq_hf": transformers alone cannot merge this type's expert keys

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def first_line(err: BaseException, limit: int = 160) -> str:
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: ``input_ids`` every architecture is compared on (text only: token ids clear of the usual special tokens).
IDS = torch.arange(20, 36).unsqueeze(0)
#: Reload tolerance on logits (max abs; the tiny models' logits are of order 1).
ATOL = 1e-3


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return out.logits.float()


def fingerprint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Sum and absolute sum of every weight matrix as the forward uses it (dequantized where packed), by name,
    experts as transformers fuses them (``<experts>.gate_up_proj`` / ``.down_proj``): what a model that needs
    image inputs is compared by. Mirrored in :data:`RELOAD`."""
    from tlq_hf.experts import UnfusedExperts
    from tlq_hf.nn import TLQLinear

    def weight(module: torch.nn.Module) -> torch.Tensor:
        return module.dequantized_weight(torch.float32) if isinstance(module, TLQLinear) else module.weight.float()

    out: dict[str, torch.Tensor] = {}
    experts = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    for name, module in model.named_modules():
        if any(name.startswith(e + ".") for e in experts):
            continue
        if isinstance(module, UnfusedExperts):
            members = [module.get_submodule(str(i)) for i in range(module.num_experts)]
            gated = hasattr(members[0], "gate_proj")
            for key, projs in (("gate_up_proj" if gated else "up_proj", ("gate_proj", "up_proj")), ("down_proj",) * 2):
                ws = [
                    weight(getattr(e, p))
                    for e in members
                    for p in ([projs] if isinstance(projs, str) else projs)
                    if hasattr(e, p)
                ]
                out[f"{name}.{key}"] = torch.stack([sum(w.sum() for w in ws), sum(w.abs().sum() for w in ws)])
        elif isinstance(module, (TLQLinear, torch.nn.Linear)):
            w = weight(module)
            out[name] = torch.stack([w.sum(), w.abs().sum()]).detach()
    return {k: v.detach() for k, v in out.items()}


def _raised_by_tlq_hf(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and "tlq_hf" in last.replace("\\", "/").split("/site-packages/")[-1]


def quantize_and_save(model_type: str, workdir: Any) -> tuple[SweepRow, Any]:
    """Build, save in full precision, quantize on load (RTN W4 per channel), save compressed-tensors under
    ``workdir/q``; returns the row (``supported`` pending the reload check) and the in-memory logits."""
    from pathlib import Path

    from tlq_hf import TLQConfig

    workdir = Path(workdir)
    name = _NAMES[model_type]
    row = SweepRow(model_type, name, "not buildable")
    try:
        model = build(model_type)
        model.save_pretrained(workdir / "fp")  # saving validates the config too
    except Exception as err:  # noqa: BLE001 - the sweep reports every failure to build
        row.reason = first_line(err)
        return row, None
    try:
        _forward(model)
        text_only = True
    except Exception:  # noqa: BLE001 - needs image inputs: compared by weights instead
        text_only = False
    del model
    cls = getattr(transformers, name)
    try:
        quantized = cls.from_pretrained(workdir / "fp", quantization_config=TLQConfig(method="rtn", group_size=-1))
    except Exception as err:  # noqa: BLE001
        row.status, row.reason = ("unsupported" if _raised_by_tlq_hf(err) else "broken"), first_line(err)
        if row.status == "broken":
            try:  # does transformers reload its own shrunk checkpoint?
                cls.from_pretrained(workdir / "fp")
            except Exception as plain:  # noqa: BLE001
                row.status, row.reason = "not buildable", f"saved config does not reload: {first_line(plain)}"
        return row, None
    try:
        coverage = quantized.tlq_report.coverage
        row.quantized, row.total = coverage.quantized, coverage.total
        logits = _forward(quantized) if text_only else fingerprint(quantized)
        quantized.save_pretrained(workdir / "q")
        from tlq_hf.formats.expert_keys import plain_reload_merges

        if not plain_reload_merges(quantized):
            row.reload = "import tlq_hf"
    except Exception as err:  # noqa: BLE001
        row.status, row.reason = "broken", first_line(err)
        return row, None
    row.status = "supported"
    return row, logits


#: Run by ``python -c`` in a fresh interpreter that never imports tlq_hf: reload every folder, write logits.
RELOAD = """
import sys, torch, transformers
if PLUGIN:
    import tlq_hf  # registers the per-expert merges transformers lacks for some MoE types
transformers.logging.set_verbosity_error()
ids = torch.arange(20, 36).unsqueeze(0)
dense = transformers.CompressedTensorsConfig(run_compressed=False)  # decompressed on load: plain weights
# float32 as saved (transformers 4.57 would otherwise build the compressed-tensors scales in float16)
f32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
out = {}
for folder, name in zip(sys.argv[1::2], sys.argv[2::2]):
    cls = getattr(transformers, name)
    try:
        try:
            model, mode = cls.from_pretrained(folder, **f32).eval(), "compressed"
        except AttributeError:  # a model whose own init reads every linear's .weight (T5-style)
            model, mode = cls.from_pretrained(folder, quantization_config=dense, **f32).eval(), "run_compressed=False"
        try:
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        except Exception:  # needs image inputs: the fingerprint of every weight matrix, as arch_sweep.fingerprint
            if mode == "compressed":
                model = cls.from_pretrained(folder, quantization_config=dense, **f32).eval()
            fp = {}
            for n, m in model.named_modules():
                if isinstance(m, torch.nn.Linear):
                    fp[n] = m.weight.float()
                for p in ("gate_up_proj", "up_proj", "down_proj"):
                    w = m._parameters.get(p)
                    if w is not None and w.ndim == 3:
                        fp[n + "." + p] = w.float()
            got = {k: torch.stack([w.sum(), w.abs().sum()]).detach() for k, w in fp.items()}
        out[folder] = (mode, got)
        assert PLUGIN or "tlq_hf" not in sys.modules
    except Exception as err:
        out[folder] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:160]
torch.save(out, OUT)
"""


def reload_in_fresh_interpreter(folders: dict[str, str], out: Any, plugin: bool = False) -> dict[str, Any]:
    """``{folder: class name}`` reloaded in one fresh interpreter, without tlq_hf unless ``plugin``:
    ``{folder: logits or error}``."""
    import subprocess
    import sys

    code = RELOAD.replace("OUT", repr(str(out))).replace("PLUGIN", repr(plugin))
    args = [a for folder, name in folders.items() for a in (folder, name)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"reload interpreter failed: {proc.stderr[-2000:]}")
    return torch.load(out, weights_only=True)


def _difference(got: Any, expected: Any) -> tuple[str, float | str]:
    """``(load mode, max difference)`` of a reload result against the in-memory logits or fingerprint, or
    ``(mode, error text)``."""
    if isinstance(got, str):
        return "", got
    mode, got = got
    if isinstance(expected, dict):  # fingerprints: the same matrices, relative differences
        if set(got) != set(expected):
            return mode, f"reloaded matrices differ: {sorted(set(got) ^ set(expected))[:3]}"
        keys = sorted(got)
        got, expected = torch.stack([got[k] for k in keys]), torch.stack([expected[k] for k in keys])
        got, expected = got / expected.abs().clamp_min(1.0), expected / expected.abs().clamp_min(1.0)
    return mode, float((got - expected).abs().max())


def sweep(workdir: Any, model_types: list[str] | None = None, progress: Any = None) -> list[SweepRow]:
    """The whole sweep: every architecture quantized and saved here, then all reloaded in one interpreter
    without tlq_hf, and those whose card says reloading needs ``import tlq_hf`` again in one with it (the
    plain reload must then fail or differ: the card's claim is checked both ways)."""
    from pathlib import Path

    workdir = Path(workdir)
    rows, expected, folders = [], {}, {}
    for model_type in model_types or list(_NAMES):
        start = time.perf_counter()
        row, logits = quantize_and_save(model_type, workdir / model_type)
        row.seconds = round(time.perf_counter() - start, 2)
        rows.append(row)
        if progress is not None:
            progress(row)
        if logits is not None:
            folder = str(workdir / model_type / "q")
            expected[folder], folders[folder] = (row, logits), row.model_class
    plain = reload_in_fresh_interpreter(folders, workdir / "reloaded.pt") if folders else {}
    flagged = {f: c for f, c in folders.items() if expected[f][0].reload != "transformers"}
    plugin = reload_in_fresh_interpreter(flagged, workdir / "reloaded-plugin.pt", plugin=True) if flagged else {}
    for folder, (row, logits) in expected.items():
        mode, diff = _difference(plain[folder], logits)
        plain_ok = isinstance(diff, float) and diff <= ATOL
        if folder in flagged:
            if plain_ok:
                row.status, row.reason = "broken", "card: reload needs import tlq_hf, yet a plain reload matches"
                continue
            mode, diff = _difference(plugin[folder], logits)
        if isinstance(diff, str):
            row.status, row.reason = "broken", f"reload: {diff}"
            continue
        row.max_logit_diff = diff
        if mode not in ("", "compressed"):  # transformers loads these compressed-tensors checkpoints decompressed only
            row.reload = f"{row.reload}, {mode}"
        if not diff <= ATOL:
            row.status, row.reason = "broken", f"reloaded model differs from in-memory by {diff:.3g}"
    return rows


__all__ = ["TEXT", "TOWER", "SweepRow", "architectures", "build", "first_line", "shrink", "sweep"]
