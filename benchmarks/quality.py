"""The quality table: every method (and peer libraries) on the trained benchmark VLMs.

    python benchmarks/quality.py            # full table (every trained model, all schemes, 3 seeds, ablations)
    python benchmarks/quality.py --quick    # one model, W3A16-g128, 1 seed
    python benchmarks/quality.py --peers    # also llm-compressor GPTQ/AWQ (needs .venv-peers, see PEERS.md)

Each calibration runs in its own subprocess (so wall time and peak RSS are per method, and peers run in
their own environment), saves a compressed-tensors checkpoint, and the parent evaluates every saved
checkpoint the same way: first-answer-token logits on held-out items of the model's own task (`vqa_task`
or `reading_task`, from its `train_vqa` recipe) against the full-precision model. Metrics: answer-token
KL(FP || quantized), flip rate (1 - top-1 agreement with FP), held-out accuracy; calibration wall time and
peak RSS of the calibrating process; per model and scheme, KL ratios (TLQ / GPTQ, TLQ / llm-compressor) and
flip differences with paired-bootstrap intervals over held-out items.

Writes into ``--out`` (default benchmarks/results; with ``--quick`` a temporary folder): quality.json
(``{"records": [...], "ratios": [...]}``: one record per model/library/method/scheme/seed, plus one
`method: "fp"` record per model with `text_prior_accuracy`), RESULTS.md and quality.png; the per-item metrics of
every table go to quality_items.pt there (committed beside quality.json, so anyone can recompute the intervals;
`--peers-only` pairs with them, `--merge` keeps those of every (model, scheme) it does not re-run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality_summary  # noqa: E402
from provenance import Measurement  # noqa: E402
from train_vqa import RECIPES, TASKS  # noqa: E402

from tlq_hf.config import TLQConfig  # noqa: E402
from tlq_hf.evaluation import FirstAnswerEval  # noqa: E402
from tlq_hf.methods import resolve_recipe  # noqa: E402

#: Benchmark model folder -> the synthetic task (key of ``train_vqa.TASKS``) it was trained on.
MODEL_TASKS: dict[str, str] = {recipe.name: recipe.task for recipe in RECIPES.values()}
#: The trained models present under ``benchmarks/models`` (the default ``--models``).
MODELS = tuple(name for name in MODEL_TASKS if (HERE / "models" / name / "config.json").exists())
SCHEMES: dict[str, dict[str, Any]] = {
    "W4A16-g128": dict(bits=4, group_size=128),
    "W3A16-g128": dict(bits=3, group_size=128),
    "W2A16-g64": dict(bits=2, group_size=64),
    # regimes where accuracy moves on these robust models: 3-bit per output channel, 2-bit in large groups
    "W3A16-ch": dict(bits=3, group_size=-1),
    "W2A16-g128": dict(bits=2, group_size=128),
    "W8A8": dict(bits=8, group_size=-1, act_bits=8),
    "W4A8": dict(bits=4, group_size=128, act_bits=8),
    # the float formats (issue 29), by their compressed-tensors preset names
    "NVFP4A16": dict(scheme="NVFP4A16"),
    "NVFP4": dict(scheme="NVFP4"),
    "MXFP4A16": dict(scheme="MXFP4A16"),
    "FP8_DYNAMIC": dict(scheme="FP8_DYNAMIC"),
}
# label -> TLQConfig fields (method first)
METHODS: dict[str, dict[str, Any]] = {
    "rtn": dict(method="rtn"),
    "smoothquant": dict(method="smoothquant"),
    "awq": dict(method="awq"),
    "gptq": dict(method="gptq"),
    "gptaq": dict(method="gptaq"),
    "mbq": dict(method="mbq"),
    "tlq-gptq": dict(method="tlq", solver="gptq"),
    "tlq-gptaq": dict(method="tlq", solver="gptaq"),
    "tlq-awq": dict(method="tlq", solver="awq"),
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "tlq importance=uniform": dict(method="tlq", importance="uniform"),
    "tlq importance=l1": dict(method="tlq", importance="l1"),
    "tlq token_fraction=0.5": dict(method="tlq", token_fraction=0.5),
    "tlq token_fraction=0.25": dict(method="tlq", token_fraction=0.25),
    "tlq exposed=off": dict(method="tlq", exposed=False),
    "tlq labels=predictive": dict(method="tlq", importance_labels="predictive"),
    "tlq answer_tokens=first": dict(method="tlq", answer_tokens="first"),
    "tlq scope=layer": dict(method="tlq", importance_scope="layer"),
    # act_order (static groups) is the default, as in llm-compressor's GPTQ; these rows show its effect
    "gptq act_order=off": dict(method="gptq", act_order=False),
    "tlq act_order=off": dict(method="tlq", act_order=False),
}
PEERS: dict[str, str] = {"llmc-gptq": "GPTQModifier", "llmc-awq": "AWQModifier"}
#: Our scheme -> llm-compressor's preset of the same format (int weights, symmetric, groups of 128 or per
#: channel; A8 = dynamic per-token int8 activations in both libraries).
PEER_SCHEMES = {"W4A16-g128": "W4A16", "W3A16-g128": "W3A16", "W8A8": "W8A8", "W4A8": "W4A8"}
PEER_SCHEMES.update({name: name for name in ("NVFP4A16", "NVFP4", "MXFP4A16", "FP8_DYNAMIC")})  # the same presets
#: The TLQ row the targets are about: TLQConfig's defaults (``tlq-<its default solver>``).
PRIMARY = f"tlq-{resolve_recipe(TLQConfig()).solver}"
TIMED = tuple(dict.fromkeys((PRIMARY, "tlq-gptq", "gptq", "tlq-awq", "awq")))  # tlq_hf rows of the time-alone pass
NUM_SAMPLES, POOL, HELD_OUT = 128, 1024, 2000
POOL_SEED, HELD_OUT_SEED = 1234, 5678


def task_of(model: str) -> Any:
    """The task module the benchmark model ``model`` was trained on."""
    return TASKS[MODEL_TASKS[model]]


def calibration_rows(seed: int, model: str) -> list[dict]:
    """The 128 calibration rows of calibration seed ``seed`` for ``model``: a seeded subset of a fixed pool of
    training items of the model's task."""
    pool = task_of(model).make_items(POOL, seed=POOL_SEED, split="train")
    order = list(range(POOL))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:NUM_SAMPLES]]


def _peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM). Not ``ru_maxrss``: Linux keeps that across
    ``execve``, so a worker would report its (larger) parent's peak from before the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- workers (subprocesses)


def _worker_tlq(job: dict) -> dict:
    import tlq_hf  # noqa: F401  registers quant_method "tlq"
    from tlq_hf import TLQConfig
    from tlq_hf.testing.tiny_models import load_auto_class

    torch.set_num_threads(job["threads"])
    out, experts = {}, {}
    config = {**job["config"], "calibration_dtype": job.get("calibration_dtype", "auto")}
    load_dtype = getattr(torch, job.get("load_dtype", "float32"))
    fields = TLQConfig(**job["scheme"])
    moe = "moe" in json.loads((Path(job["model"]) / "config.json").read_text())["model_type"]
    if fields.grid != "int" or (fields.act_bits and moe):
        # tlq_hf's own format (the same codes): compressed-tensors decompresses FP4 weights to bfloat16 whatever the
        # model's dtype (plain transformers cannot run them in the float32 evaluation model), and transformers
        # cannot reload activation-quantized or float experts of an MoE model from compressed-tensors
        config["save_format"] = "tlq"
    for seed in job["seeds"]:
        cfg = TLQConfig(
            dataset=calibration_rows(seed, job["model_name"]), num_samples=NUM_SAMPLES, **job["scheme"], **config
        )
        start = time.perf_counter()
        model = load_auto_class().from_pretrained(job["model"], quantization_config=cfg, dtype=load_dtype)
        seconds = time.perf_counter() - start
        model.save_pretrained(Path(job["out"]) / f"seed{seed}")
        out[seed] = seconds
        layers = model.tlq_report.layers
        if any(layer.expert_tokens for layer in layers):  # MoE: calibration tokens each expert received
            experts[seed] = [sum(layer.expert_tokens.values(), []) for layer in layers]
    result = {"calib_seconds": out, "peak_rss_mb": _peak_rss_mb()}
    return {**result, "expert_tokens": experts} if experts else result


def _worker_llmc(job: dict) -> dict:
    """llm-compressor oneshot on the same rows, encoded by the same processor and chat template."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoProcessor

    from tlq_hf.arch import find_decoder_stack
    from tlq_hf.data import build_calibration_set
    from tlq_hf.testing.tiny_models import load_auto_class

    torch.set_num_threads(job["threads"])
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache for faster host-to-device copies, which raises
        # without an NVIDIA driver; pinning is only a transfer optimisation, so on a CPU-only machine skip it
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    processor = AutoProcessor.from_pretrained(job["model"])
    scheme = PEER_SCHEMES[job["scheme_name"]]
    # MoE routers (``mlp.gate``) too, as llm-compressor's own MoE examples do; oneshot linearises the experts
    # and calibrates every expert on every token (its default)
    ignore = ["re:.*lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    ignore.append("re:.*mlp\\.gate$")
    evaluator = Evaluator(
        job["model"], job["held_out"], task_of(job["model_name"])
    )  # encodes the held-out items once for every seed
    out, oneshot_seconds = {}, {}
    for seed in job["seeds"]:
        rows = calibration_rows(seed, job["model_name"])
        # the clock starts where tlq_hf's does (raw rows and a model path): encoding and loading are included
        start = time.perf_counter()
        samples = build_calibration_set(rows, processor, NUM_SAMPLES)
        # rows keep the processor's exact tensors (batch dim included); the collator restores dtypes
        ds = Dataset.from_list([{k: v.tolist() for k, v in s.inputs.items()} for s in samples])
        dtypes = {k: v.dtype for k, v in samples[0].inputs.items()}

        def collate(batch, dtypes=dtypes):
            return {k: torch.tensor(v, dtype=dtypes[k]) for k, v in batch[0].items()}

        model = load_auto_class().from_pretrained(job["model"], dtype=torch.float32)
        if job["modifier"] == "AWQModifier":  # a transform: scales, then a quantization modifier rounds
            mappings = _peer_awq_mappings(model)
            recipe = [
                AWQModifier(mappings=mappings),
                QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore),
            ]
        else:
            recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore)
        layer_class = type(find_decoder_stack(model).layers[0]).__name__  # llm-compressor's sequential unit
        start_oneshot = time.perf_counter()
        oneshot(
            model=model,
            sequential_targets=[layer_class],
            dataset=ds,
            recipe=recipe,
            num_calibration_samples=NUM_SAMPLES,
            max_seq_length=4096,
            data_collator=collate,
            processor=processor,
        )
        out[seed] = time.perf_counter() - start
        oneshot_seconds[seed] = time.perf_counter() - start_oneshot
        # evaluated here, in the peer's own environment: its checkpoints of these VLMs do not reload in
        # transformers 5.23 (it writes `ignore` as literal module names, which transformers renames on load)
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        torch.save(evaluator.logprobs(model), Path(job["out"]) / f"seed{seed}.pt")
        model.save_pretrained(Path(job["out"]) / f"seed{seed}", save_compressed=True)
    return {"calib_seconds": out, "oneshot_seconds": oneshot_seconds, "peak_rss_mb": _peak_rss_mb()}


#: a VLM's language-model decoder layers, as llm-compressor's own VLM mappings scope them (Qwen2.5-VL, Muse)
_LM_LAYERS = r"re:.*language_model\.layers\.\d+\."


def _peer_awq_mappings(model) -> list:
    """llm-compressor's own AWQ mappings for ``model``'s architecture, as its ``AWQModifier()`` without mappings would
    pick them (its registry by class name, else its MoE or dense default), each pattern scoped to the language
    model's decoder layers: its unscoped ``re:.*q_proj$`` also matches the vision tower's projections, and the
    resolution then fails to find one smoothing layer for them (a VLM user has to scope them; patterns that name
    ``language_model`` already are kept). Gemma 3 thus gets its own mappings: the MLP behind
    ``pre_feedforward_layernorm``, no input-norm -> q/k/v smoothing."""
    from llmcompressor.modifiers.transform.awq import mappings as peer

    registered = peer.AWQ_MAPPING_REGISTRY.get(type(model).__name__)
    moe = any(n.endswith("mlp.experts") for n, _ in model.named_modules())
    chosen = registered or (peer._moe_default_mappings if moe else peer.default_mappings)

    def scoped(pattern: str) -> str:
        if "language_model" in pattern or not pattern.startswith("re:.*"):
            return pattern
        return _LM_LAYERS + "(?:.*\\.)?" + pattern[len("re:.*") :]

    return [
        peer.AWQMapping(scoped(m.smooth_layer), [scoped(b) for b in m.balance_layers], m.activation_hook_target)
        for m in chosen
    ]


def _run_worker(python: str, job: dict, timeout: int = 3600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    measured = Measurement(" ".join(["python benchmarks/quality.py", *sys.argv[1:]]))
    proc = subprocess.run(
        [python, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
            "stderr": proc.stderr[-4000:],
        }
    # the record of the job's whole run (a worker that shared the cores with another is marked contended)
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"provenance": measured.record()}


# ----------------------------------------------------------------------------- evaluation (parent)


class Evaluator(FirstAnswerEval):
    """:class:`tlq_hf.evaluation.FirstAnswerEval` on ``n_items`` held-out items of a benchmark model's task."""

    def __init__(
        self,
        model_dir: str,
        n_items: int,
        task: Any,
        batch_size: int = 64,
        seed: int = HELD_OUT_SEED,
        split: str = "test",
    ) -> None:
        from transformers import AutoProcessor

        super().__init__(
            AutoProcessor.from_pretrained(model_dir), task.make_items(n_items, seed=seed, split=split), batch_size
        )
        self.items = self.rows


def _load(path: Path):
    from tlq_hf.testing.tiny_models import load_auto_class

    return load_auto_class().from_pretrained(path, dtype=torch.float32)


# ----------------------------------------------------------------------------- per-item metrics, ratios


#: (numerator, denominator) method pairs whose KL ratio and flip difference get bootstrap intervals.
RATIO_PAIRS = tuple(
    dict.fromkeys(
        (
            (PRIMARY, "gptq"),
            ("tlq-gptq", "gptq"),
            ("tlq-gptaq", "gptq"),
            ("gptaq", "gptq"),
            ("tlq-awq", "awq"),
            (PRIMARY, "llmc-gptq"),
            (PRIMARY, "llmc-awq"),
        )
    )
)


class ItemMetrics:
    """Per held-out item KL and flip of every (model, method, scheme), averaged over the seeds that ran.

    The table's ratios (TLQ / GPTQ answer KL, per model) get confidence intervals from these: a paired
    bootstrap over held-out items, the same resampled items for both methods.
    """

    def __init__(self) -> None:
        self._kl: dict[tuple[str, str, str], list[torch.Tensor]] = {}
        self._flips: dict[tuple[str, str, str], list[torch.Tensor]] = {}

    def add(self, model: str, method: str, scheme: str, kl: torch.Tensor, flips: torch.Tensor) -> None:
        """One seed's per-item KL and flips (bool) of ``method`` on ``model`` at ``scheme``."""
        self._kl.setdefault((model, method, scheme), []).append(kl.double())
        self._flips.setdefault((model, method, scheme), []).append(flips.double())

    def save(self, path: Path) -> None:
        """Write every run's per-item tensors (so a partial re-run, e.g. ``--peers-only``, can pair with them):
        KL in float64, flips as booleans, gzip-compressed (committed: a few MB for every table)."""
        flat = {
            "|".join(k) + f"|{kind}|{i}": t.bool() if kind == "flips" else t
            for kind, store in (("kl", self._kl), ("flips", self._flips))
            for k, runs in store.items()
            for i, t in enumerate(runs)
        }
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            torch.save(flat, f)  # mtime=0: the same metrics give the same bytes

    @classmethod
    def load(cls, path: Path) -> ItemMetrics:
        """The per-item metrics :meth:`save` wrote (empty when there is no file)."""
        out = cls()
        if path.exists():
            with path.open("rb") as raw:
                gzipped = raw.read(2) == b"\x1f\x8b"  # files written before compression are plain torch.save
            with (gzip.open if gzipped else open)(path, "rb") as f:
                flat = torch.load(f, weights_only=True)
            for name, tensor in sorted(flat.items()):
                model, method, scheme, kind, _ = name.split("|")
                store = out._kl if kind == "kl" else out._flips
                store.setdefault((model, method, scheme), []).append(tensor.double())
        return out

    def drop(self, keep: Callable[[str, str, str], bool]) -> None:
        """Forget the runs for which ``keep(model, method, scheme)`` is false (they are about to be re-run)."""
        for store in (self._kl, self._flips):
            for key in [k for k in store if not keep(*k)]:
                del store[key]

    def _mean(self, store: dict, key: tuple[str, str, str]) -> torch.Tensor | None:
        runs = store.get(key)
        return torch.stack(runs).mean(0) if runs else None

    def ratio(self, model: str, scheme: str, num: str, den: str, resamples: int = 2000) -> dict | None:
        """KL(num) / KL(den) and flips(num) - flips(den) with 95 % paired-bootstrap intervals, or None."""
        a, b = self._mean(self._kl, (model, num, scheme)), self._mean(self._kl, (model, den, scheme))
        fa, fb = self._mean(self._flips, (model, num, scheme)), self._mean(self._flips, (model, den, scheme))
        if a is None or b is None or float(b.mean()) <= 0:
            return None
        generator = torch.Generator().manual_seed(0)
        index = torch.randint(len(a), (resamples, len(a)), generator=generator)
        ratios = a[index].mean(1) / b[index].mean(1)
        diffs = fa[index].mean(1) - fb[index].mean(1)
        q = torch.tensor([0.025, 0.975], dtype=torch.float64)
        return dict(
            model=model,
            scheme=scheme,
            numerator=num,
            denominator=den,
            seeds=[len(self._kl[(model, num, scheme)]), len(self._kl[(model, den, scheme)])],
            items=len(a),
            kl_ratio=float(a.mean() / b.mean()),
            kl_ratio_ci95=[float(v) for v in torch.quantile(ratios, q)],
            flip_diff=float(fa.mean() - fb.mean()),
            flip_diff_ci95=[float(v) for v in torch.quantile(diffs, q)],
        )

    def ratios(self, models: list[str], schemes: list[str]) -> list[dict]:
        """:meth:`ratio` of every :data:`RATIO_PAIRS` pair that ran, per model and scheme."""
        out = []
        for model in models:
            for scheme in schemes:
                for num, den in RATIO_PAIRS:
                    found = self.ratio(model, scheme, num, den)
                    if found is not None:
                        out.append(found)
        return out


# ----------------------------------------------------------------------------- the table


def _job(model: str, label: str, scheme: str) -> dict:
    """A tlq_hf job (``label`` in METHODS / ABLATIONS) or an llm-compressor job (``label`` in PEERS)."""
    job = dict(model_name=model, label=label, scheme_name=scheme)
    if label in PEERS:
        return job | dict(kind="llmc", modifier=PEERS[label])
    return job | dict(kind="tlq", config=METHODS.get(label) or ABLATIONS[label])


def _jobs(args) -> list[dict]:
    jobs = []
    for model in args.models:
        for scheme in args.schemes:
            labels = list(METHODS)
            if scheme == "W3A16-g128" and not args.quick:
                labels += list(ABLATIONS)
            if args.peers and scheme in PEER_SCHEMES:
                labels += list(PEERS)
            jobs += [_job(model, label, scheme) for label in labels if not args.methods or label in args.methods]
    return jobs


def _fp_records(args, evaluators: dict, refs: dict) -> list[dict]:
    """Evaluate each FP model once: the reference log-probs, FP accuracy and the text-only prior."""
    records = []
    for model in args.models:
        path = HERE / "models" / model
        task = task_of(model)
        ev = Evaluator(str(path), args.held_out, task)
        refs[model] = ev.logprobs(_load(path))
        prior = task.text_prior_accuracy(task.make_items(4000, seed=POOL_SEED, split="train"), ev.items)
        fp_acc = float((refs[model].argmax(-1) == ev.answers).float().mean())
        records.append(
            dict(
                model=model,
                library="fp",
                method="fp",
                scheme="fp",
                seed=None,
                accuracy=fp_acc,
                kl=0.0,
                agreement=1.0,
                calib_seconds=0.0,
                peak_rss_mb=None,
                text_prior_accuracy=prior,
                task=MODEL_TASKS[model],
            )
        )
        print(f"{model}: FP accuracy {fp_acc:.1%}, text-only prior {prior:.1%} on {len(ev.items)} items", flush=True)
        evaluators[model] = ev
    return records


def _evaluate_job(
    job: dict, result: dict, ev: Evaluator, ref: torch.Tensor, phase: str, items: ItemMetrics
) -> list[dict]:
    """Records for every seed of one finished worker (or one error record); per-item metrics go to ``items``."""
    library = "llm-compressor" if job["kind"] == "llmc" else "tlq_hf"
    base = dict(model=job["model_name"], library=library, method=job["label"], scheme=job["scheme_name"], phase=phase)
    if "error" in result:
        print(f"{job['model_name']} {job['label']} {job['scheme_name']}: FAILED {result['error']}", flush=True)
        return [dict(base, seed=None, error=result["error"])]
    records = []
    for seed in job["seeds"]:
        ckpt = Path(job["out"]) / f"seed{seed}"
        reload_error = None
        if job["kind"] == "llmc":
            # the peer's own evaluation (in its process, on the model oneshot returned) is authoritative; the
            # reload of its checkpoint here is checked separately, a failure or a mismatch is a finding
            logprobs = torch.load(Path(job["out"]) / f"seed{seed}.pt", weights_only=True)
            reload_error = _check_peer_reload(ckpt, ev, logprobs)
        else:
            logprobs = ev.logprobs(_load(ckpt))
        m = ev.metrics(ref, logprobs)
        if phase == "table" and torch.isfinite(logprobs).all():
            items.add(
                job["model_name"],
                job["label"],
                job["scheme_name"],
                ev.item_kl(ref, logprobs),
                logprobs.argmax(-1) != ref.argmax(-1),
            )
        rec = dict(
            base,
            seed=seed,
            **m,
            calib_seconds=result["calib_seconds"][str(seed)],
            **({"oneshot_seconds": result["oneshot_seconds"][str(seed)]} if "oneshot_seconds" in result else {}),
            peak_rss_mb=result["peak_rss_mb"],
        )
        if str(seed) in result.get("expert_tokens", {}):  # MoE: tokens per expert, per layer
            rec["expert_tokens"] = result["expert_tokens"][str(seed)]
        if reload_error:
            rec["reload_error"] = reload_error
        rec.update(result.get("provenance", {}))
        records.append(rec)
        print(
            f"{rec['model']:12s} {rec['scheme']:11s} {rec['method']:24s} seed {seed}: acc {m['accuracy']:.1%} "
            f"KL {m['kl']:.2e} flips {1 - m['agreement']:.1%} {rec['calib_seconds']:.1f}s "
            f"{rec['peak_rss_mb']:.0f} MB [{phase}]",
            flush=True,
        )
    shutil.rmtree(job["out"], ignore_errors=True)
    return records


def _check_peer_reload(ckpt: Path, ev: Evaluator, own: torch.Tensor) -> str | None:
    """None if the peer's checkpoint reloads here and reproduces the peer's own log-probs, else why not."""
    try:
        reloaded = ev.logprobs(_load(ckpt))
    except Exception as err:  # noqa: BLE001 - a peer checkpoint that does not reload is a finding
        return f"{type(err).__name__}: {err}"[:300]
    if not torch.isfinite(reloaded).all():
        return "reloads without error but its outputs are non-finite (NaN)"
    diff = float((reloaded - own).abs().max())
    return None if diff < 1e-3 else f"reloads without error but its log-probs differ (max abs diff {diff:.3g})"


def _prepare(job: dict, args, work: Path, seeds: list[int], threads: int, tag: str) -> tuple[str, dict]:
    job.update(
        model=str(HERE / "models" / job["model_name"]),
        scheme=SCHEMES[job["scheme_name"]],
        seeds=seeds,
        threads=threads,
        held_out=args.held_out,
        out=str(work / f"{tag}-{job['model_name']}-{job['label']}-{job['scheme_name']}".replace(" ", "_")),
        load_dtype=args.load_dtype,
        calibration_dtype=args.calibration_dtype,
    )
    return (args.peers_python if job["kind"] == "llmc" else sys.executable), job


def _timing_jobs(args) -> list[dict]:
    """TLQ (both solvers), GPTQ, AWQ and (with --peers) llm-compressor GPTQ and AWQ at W4A16-g128, for the
    time-alone pass."""
    labels = list(TIMED) + (list(PEERS) if args.peers else [])
    models = args.timing_models or args.models
    return [_job(model, label, "W4A16-g128") for model in models for label in labels]


#: where a run writes (``--out``); committed results live here, a ``--quick`` run writes elsewhere by default
RESULTS = HERE / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "tlq-quality-quick"
ITEMS_NAME = "quality_items.pt"  # per-item metrics of every table record (committed)


def _old_records(out: Path) -> list[dict]:
    data = json.loads((out / "quality.json").read_text())
    return data["records"] if isinstance(data, dict) else data


def run(args) -> tuple[list[dict], ItemMetrics]:
    """The table (``args.jobs`` workers at a time, one torch thread each), then the time-alone pass.

    With ``--timing-only`` the table records come from the existing quality.json and only the time-alone
    pass is re-run (its records replace the old ones); ``--peers-only`` keeps every tlq_hf record and the
    per-item metrics of the last table (``--out``/``quality_items.pt``) and re-runs the llm-compressor jobs."""
    kept = args.timing_only or args.peers_only or args.merge
    items = ItemMetrics.load(args.out / ITEMS_NAME) if kept else ItemMetrics()
    threads = 1 if args.jobs > 1 else args.threads  # per table worker
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="tlq-quality-"))
    evaluators: dict[str, Evaluator] = {}
    refs: dict[str, torch.Tensor] = {}
    records = _fp_records(args, evaluators, refs)
    table_jobs = _jobs(args)
    if args.merge:  # keep every old record of a (model, scheme) not re-run, and the old time-alone pass
        rerun = {(m, s) for m in args.models for s in args.schemes}
        items.drop(lambda model, method, scheme: (model, scheme) not in rerun)
        records += [
            r
            for r in _old_records(args.out)
            if (r["method"] == "fp" and r["model"] not in args.models)
            or (r["method"] != "fp" and r.get("phase") != "timing" and (r["model"], r["scheme"]) not in rerun)
            or (r.get("phase") == "timing" and (args.no_timing or args.quick))
        ]
    if args.timing_only or args.peers_only:  # keep the old records that are not re-run
        old = _old_records(args.out)
        if args.timing_only:
            records, table_jobs = [r for r in old if r.get("phase") != "timing"], []
        else:  # every llm-compressor job, table and time-alone pass
            records = [r for r in old if r["library"] != "llm-compressor"]
            items.drop(lambda model, method, scheme: method not in PEERS)
            table_jobs = [j for j in table_jobs if j["kind"] == "llmc"]
    prepared = [_prepare(job, args, work, args.seeds, threads, "table") for job in table_jobs]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run_worker, python, job) for python, job in prepared]
        for (_, job), future in zip(prepared, futures, strict=True):
            ev, ref = evaluators[job["model_name"]], refs[job["model_name"]]
            records += _evaluate_job(job, future.result(), ev, ref, "table", items)
    if not args.quick and not args.no_timing:
        # calibration time on an otherwise idle machine, one process at a time, args.threads threads
        for job in _timing_jobs(args):
            if args.peers_only and job["kind"] != "llmc":
                continue
            python, job = _prepare(job, args, work, args.seeds, args.threads, "timing")
            ev, ref = evaluators[job["model_name"]], refs[job["model_name"]]
            records += _evaluate_job(job, _run_worker(python, job), ev, ref, "timing", items)
    shutil.rmtree(work, ignore_errors=True)
    items.save(args.out / ITEMS_NAME)
    return records, items


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("phase", "table") == "table"]


def _mean_of(records: list[dict], model: str, method: str, scheme: str, key: str, phase: str = "table") -> float | None:
    vals = [
        r[key] if key != "flips" else 1 - r["agreement"]
        for r in records
        if r["model"] == model
        and r["method"] == method
        and r["scheme"] == scheme
        and r.get("phase", "table") == phase
        and "error" not in r
        and _finite(r)
    ]
    return statistics.fmean(vals) if vals else None


def _finite(record: dict) -> bool:
    """False for a run whose quantized model produced non-finite log-probs (a failed run, reported apart)."""
    return "kl" not in record or math.isfinite(record["kl"])


def _timing_section(records: list[dict], args) -> list[str]:
    rows = [r for r in records if r.get("phase") == "timing" and "error" not in r]
    if not rows:
        return []
    lines = [
        "## Calibration time alone (W4A16-g128)",
        "",
        f"One calibrating process at a time on the otherwise idle machine, {args.threads} torch threads, "
        f"{NUM_SAMPLES} samples, seeds {args.seeds} (the table above ran {args.jobs} workers at a time, one thread "
        "each, so its times are under load). Time = from the raw rows and the model path to the quantized model in "
        "memory: tlq_hf's quantize-on-load `from_pretrained`; llm-compressor's row encoding (same processor), model "
        "load and `oneshot` (the `oneshot` call alone in parentheses).",
        "",
        "| model | library | method | calib s (mean ± std) | peak RSS MB | ratio to gptq | ratio to llm-compressor "
        "(same solver) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in args.timing_models or args.models:
        for method in (*TIMED, *PEERS):
            group = [r for r in rows if r["model"] == model and r["method"] == method]
            if not group:
                continue
            peer_label = "llmc-awq" if method.endswith("awq") else "llmc-gptq"
            peer = _mean_of(records, model, peer_label, "W4A16-g128", "calib_seconds", "timing")
            mean, std = _mean_std([r["calib_seconds"] for r in group])
            ours = _mean_of(records, model, "gptq", "W4A16-g128", "calib_seconds", "timing")
            to_gptq = f"{mean / ours:.2f}x" if ours else "n/a"
            ratio = f"{mean / peer:.2f}x" if peer else "n/a"
            if "oneshot_seconds" in group[0]:
                ratio += f" (oneshot alone {statistics.fmean(r['oneshot_seconds'] for r in group):.2f} s)"
            lines.append(
                f"| {model} | {group[0]['library']} | {method} | {mean:.2f} ± {std:.2f} | {_rss(group[0])} | {to_gptq} "
                f"| {ratio} |"
            )
    return lines + [""]


def _rss(record: dict) -> str:
    return "n/a" if record.get("peak_rss_mb") is None else f"{record['peak_rss_mb']:.0f}"


def _ratio_section(ratios: list[dict], args) -> list[str]:
    """Per model and scheme: answer-KL ratios and flip differences with paired-bootstrap 95 % intervals."""
    if not ratios:
        return []
    lines = [
        "## Ratios (paired bootstrap over held-out items, 95 % interval)",
        "",
        "KL ratio = mean answer KL of the first method / the second (per item averaged over seeds first); "
        "flip diff = flip rate of the first minus the second (negative: fewer flips).",
        "",
        "| model | scheme | methods | KL ratio | 95 % CI | flip diff | 95 % CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ratios:
        lo, hi = r["kl_ratio_ci95"]
        flo, fhi = r["flip_diff_ci95"]
        lines.append(
            f"| {r['model']} | {r['scheme']} | {r['numerator']} / {r['denominator']} | {r['kl_ratio']:.2f} "
            f"| {lo:.2f} - {hi:.2f} | {r['flip_diff']:+.2%} | {flo:+.2%} - {fhi:+.2%} |"
        )
    lines += ["", "Geometric mean over models of the KL ratios against GPTQ:", ""]
    for num in dict.fromkeys(r["numerator"] for r in ratios if r["denominator"] == "gptq"):
        for scheme in args.schemes:
            values = [
                r["kl_ratio"]
                for r in ratios
                if (r["scheme"], r["numerator"], r["denominator"]) == (scheme, num, "gptq")
            ]
            if values and all(v > 0 for v in values):
                geo = quality_summary.geomean(values)
                lines.append(f"- {num} / gptq, {scheme}: {geo:.2f} over {len(values)} models")
    return lines + [""]


def _targets_section(records: list[dict], ratios: list[dict], args) -> list[str]:
    """The quality issue's targets, computed from the records and ratios (met / not met)."""
    lines = ["## Targets", ""]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    pairs = {(r["model"], r["scheme"], r["numerator"], r["denominator"]): r for r in ratios}
    for scheme in ("W3A16-g128", "W2A16-g64", "W4A8", "NVFP4A16", "NVFP4"):
        found = [pairs.get((m, scheme, PRIMARY, "gptq")) for m in args.models]
        found = [r for r in found if r is not None]
        if not found:
            continue
        worse = [r["model"] for r in found if r["kl_ratio"] > 1]
        lines.append(
            f"- {scheme}: TLQ mean answer KL <= GPTQ's on every model: {verdict(not worse)}"
            + (f" (worse on {', '.join(worse)})" if worse else "")
        )
        flips = [r["model"] for r in found if r["flip_diff_ci95"][0] > 0]
        lines.append(
            f"- {scheme}: TLQ flips never worse than GPTQ's beyond the interval: {verdict(not flips)}"
            + (f" (worse on {', '.join(flips)})" if flips else "")
        )
        target = {"W3A16-g128": 0.6, "NVFP4A16": 0.7, "NVFP4": 0.7}.get(scheme)
        if target is not None:
            geo = quality_summary.geomean(max(r["kl_ratio"], 1e-12) for r in found)
            lines.append(
                f"- {scheme}: geometric mean TLQ/GPTQ KL over {len(found)} models {geo:.2f} (target <= {target}): "
                f"{verdict(geo <= target)}"
            )
    for scheme in ("W4A16-g128", "W3A16-g128", "NVFP4A16", "NVFP4"):
        for peer in PEERS:
            found = [pairs.get((m, scheme, PRIMARY, peer)) for m in args.models]
            found = [r for r in found if r is not None]
            if found:
                worse = [r["model"] for r in found if r["kl_ratio"] >= 1]
                lines.append(
                    f"- {scheme}: TLQ below {peer} on every model: {verdict(not worse)}"
                    + (f" (not on {', '.join(worse)})" if worse else "")
                )
    for model in args.models:
        fp = next(r["accuracy"] for r in records if r["model"] == model and r["method"] == "fp")
        for scheme in args.schemes:
            # TLQ's default against every baseline and peer (its own variants are not competitors)
            rivals = [m for m in [*METHODS, *PEERS] if m == PRIMARY or not m.startswith("tlq")]
            accs = {m: _mean_of(records, model, m, scheme, "accuracy") for m in rivals}
            accs = {m: v for m, v in accs.items() if v is not None}
            # "accuracy moves": the worst method loses at least 2 points of FP accuracy
            if PRIMARY not in accs or fp - min(accs.values()) < 0.02:
                continue
            best = max(accs, key=accs.get)
            lines.append(
                f"- {model} {scheme} (accuracy moves: {min(accs.values()):.1%} to {max(accs.values()):.1%} vs FP "
                f"{fp:.1%}): TLQ retains the most: {verdict(accs[PRIMARY] >= accs[best])} ({PRIMARY} "
                f"{accs[PRIMARY] / fp:.1%} of FP; best {best} {accs[best] / fp:.1%})"
            )
        tlq_t, gptq_t = (
            _mean_of(records, model, m, "W4A16-g128", "calib_seconds", "timing") for m in (PRIMARY, "gptq")
        )
        if tlq_t is not None and gptq_t:
            lines.append(
                f"- {model} calibration time {PRIMARY} / gptq = {tlq_t / gptq_t:.2f}x (target <= 1.3x): "
                f"{verdict(tlq_t / gptq_t <= 1.3)}"
            )
    return lines + [""]


def write_results(records: list[dict], ratios: list[dict], args, wall: float) -> None:
    results = args.out
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.json").write_text(json.dumps({"records": records, "ratios": ratios}, indent=1))
    meta_path = results / "quality_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    key = "timing_only" if args.timing_only else "peers_only" if args.peers_only else "merge" if args.merge else "table"
    run_meta = {"command": f"python benchmarks/quality.py {' '.join(args.argv)}", "wall_min": round(wall / 60, 1)}
    if key == "merge":
        meta.setdefault("merges", []).append(run_meta | {"schemes": list(args.rerun_schemes)})
    else:
        meta[key] = run_meta
    if key == "table":
        meta = {"table": meta["table"]}
    table = meta.get("table", run_meta)
    timing_note = ""
    for merge in meta.get("merges", []):
        timing_note += (
            f" The {', '.join(merge['schemes'])} rows were re-run with `{merge['command']}` ({merge['wall_min']} min)."
        )
    for rerun, what in (("timing_only", "The time-alone pass was"), ("peers_only", "The llm-compressor jobs were")):
        if rerun in meta:
            again = meta[rerun]
            timing_note += f" {what} re-run with `{again['command']}` ({again['wall_min']} min)."
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    lines = [
        "# Quality table: trained benchmark VLMs",
        "",
        f"Command: `{table['command']}`"
        f" ({table['wall_min']:.1f} min on this machine).{timing_note} {NUM_SAMPLES} calibration items per seed (seeds "
        f"{args.seeds}), {args.held_out} held-out items; KL(FP || quantized) and flips at the first answer "
        "token; mean ± std over seeds. Calibration time and peak RSS are per calibrating process.",
        "",
    ]
    failures: list[str] = []
    for model in args.models:
        fp = next(r for r in records if r["model"] == model and r["method"] == "fp")
        lines += [
            f"## {model}",
            "",
            f"FP held-out accuracy {fp['accuracy']:.1%}; text-only prior {fp['text_prior_accuracy']:.1%}.",
            "",
        ]
        for scheme in args.schemes:
            rows = [r for r in _table(records) if r["model"] == model and r["scheme"] == scheme]
            if not rows:
                continue
            lines += [
                f"### {scheme}",
                "",
                "| library | method | KL | flips | accuracy | calib s | peak RSS MB |",
                "|---|---|---|---|---|---|---|",
            ]
            seen = []
            for r in rows:
                key = (r["library"], r["method"])
                if key in seen:
                    continue
                seen.append(key)
                group = [x for x in rows if (x["library"], x["method"]) == key]
                if "error" in group[0]:
                    lines.append(f"| {key[0]} | {key[1]} | failed: {group[0]['error']} | | | | |")
                    continue
                bad = [x["seed"] for x in group if not _finite(x)]
                group = [x for x in group if _finite(x)]
                if bad:
                    failures.append(f"{model} {scheme} {key[0]} {key[1]}: seed(s) {bad}")
                if not group:
                    lines.append(f"| {key[0]} | {key[1]} | non-finite output on every seed | | | | |")
                    continue
                kl, kls = _mean_std([x["kl"] for x in group])
                fl, fls = _mean_std([1 - x["agreement"] for x in group])
                ac, acs = _mean_std([x["accuracy"] for x in group])
                ts, _ = _mean_std([x["calib_seconds"] for x in group])
                lines.append(
                    f"| {key[0]} | {key[1]}{' (†)' if bad else ''} | {kl:.2e} ± {kls:.1e} | {fl:.2%} ± {fls:.2%} | "
                    f"{ac:.2%} ± {acs:.2%} | {ts:.1f} | {_rss(group[0])} |"
                )
            lines.append("")
    if failures:
        lines += [
            "(†) Mean ± std over the finite seeds only: these runs produced non-finite (NaN) log-probabilities on "
            "the held-out items, i.e. a broken model: " + "; ".join(failures) + ".",
            "",
        ]
    if any(r.get("peak_rss_mb") is None for r in _table(records) if r["method"] != "fp" and "error" not in r):
        lines += [
            "Peak RSS is n/a in table rows whose worker read `ru_maxrss`, which Linux carries over from the parent "
            "process across `exec` (it reported the parent's peak); workers now read VmHWM, and the time-alone pass "
            "below measures it.",
            "",
        ]
    lines += _ratio_section(ratios, args) + _timing_section(records, args) + _targets_section(records, ratios, args)
    peer_rows = [r for r in records if r["library"] == "llm-compressor" and "kl" in r]
    failed = [r for r in peer_rows if r.get("reload_error")]
    if peer_rows:
        example = f" (e.g. `{failed[0]['reload_error']}`)" if failed else ""
        lines += [
            f"Peer rows are the peer's own evaluation of the model `oneshot` returned, in its environment, with "
            f"the same evaluation code. Its saved checkpoints failed to reload here (transformers "
            f"{_transformers_version()}) or reproduce those outputs in {len(failed)} of {len(peer_rows)} runs"
            f"{example}.",
            "",
        ]
    (results / "RESULTS.md").write_text("\n".join(lines))
    _plot(records, args, results / "quality.png")
    if results.resolve() == RESULTS.resolve():  # the committed table: the README's summary follows it
        quality_summary.write({"records": records, "ratios": ratios})


def _plot(records: list[dict], args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(args.models), figsize=(7 * len(args.models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], args.models):
        methods = []
        for r in records:
            if r["model"] == model and "error" not in r and r["method"] not in methods:
                if r["method"] in METHODS or r["method"] in PEERS:
                    methods.append(r["method"])
        width = 0.8 / max(len(methods), 1)
        for k, method in enumerate(methods):
            ys = []
            for scheme in args.schemes:
                vals = [
                    r["kl"]
                    for r in records
                    if r["model"] == model
                    and r["method"] == method
                    and r["scheme"] == scheme
                    and "kl" in r
                    and r.get("phase", "table") == "table"
                    and _finite(r)
                ]
                ys.append(statistics.fmean(vals) if vals else float("nan"))
            ax.bar([i + k * width for i in range(len(args.schemes))], ys, width, label=method)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(args.schemes))], args.schemes)
        ax.set_title(f"{model}: answer-token KL vs FP (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        result = _worker_llmc(job) if job["kind"] == "llmc" else _worker_tlq(job)
        print(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one model, W3A16-g128, one seed, no ablations")
    p.add_argument(
        "--out",
        default=None,
        help=f"folder of quality.json / RESULTS.md / quality.png (default {RESULTS}; with --quick {QUICK_RESULTS}, "
        "so a quick run never overwrites the committed results)",
    )
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    p.add_argument("--methods", nargs="*", help="only these method / ablation / peer labels (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--held-out", type=int, default=HELD_OUT)
    p.add_argument("--peers", action="store_true", help="also run llm-compressor (python from --peers-python)")
    p.add_argument("--peers-python", default=str(HERE.parent / ".venv-peers" / "bin" / "python"))
    p.add_argument("--threads", type=int, default=2, help="torch threads of a worker when --jobs 1 and when timing")
    p.add_argument("--jobs", type=int, default=2, help="calibration workers at a time (one thread each if > 1)")
    p.add_argument("--no-timing", action="store_true", help="skip the time-alone pass")
    p.add_argument(
        "--load-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype tlq_hf's workers load the full-precision model in before quantizing (the reference is float32)",
    )
    p.add_argument(
        "--calibration-dtype",
        default="auto",
        choices=["auto", "float32"],
        help="TLQConfig(calibration_dtype=...) of tlq_hf's workers (what a bf16 model's layers compute in)",
    )
    p.add_argument("--timing-models", nargs="*", help="models of the time-alone pass (default: --models)")
    p.add_argument("--timing-only", action="store_true", help="re-run only the time-alone pass (keeps the table)")
    p.add_argument("--peers-only", action="store_true", help="re-run only the llm-compressor jobs (with --peers)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="re-run only --models x --schemes and keep every other record and ratio of quality.json",
    )
    args = p.parse_args()
    args.argv = sys.argv[1:]
    args.out = Path(args.out) if args.out else (QUICK_RESULTS if args.quick else RESULTS)
    args.out.mkdir(parents=True, exist_ok=True)
    missing = [m for m in args.models if m not in MODELS]
    if missing:
        recipes = {r.name: key for key, r in RECIPES.items()}
        hints = [
            f"python benchmarks/train_vqa.py --model {recipes[m]}" if m in recipes else f"{m}: unknown" for m in missing
        ]
        p.error(f"no trained benchmark model {missing} under benchmarks/models; train it first: {'; '.join(hints)}")
    if args.quick:
        args.models, args.schemes, args.seeds = args.models[:1], ["W3A16-g128"], args.seeds[:1]
    start = time.perf_counter()
    records, items = run(args)
    ratios = items.ratios(args.models, args.schemes)
    if args.merge or args.timing_only:  # the old ratios of every (model, scheme) not re-run here
        fresh = {(r["model"], r["scheme"]) for r in ratios}
        old = json.loads((args.out / "quality.json").read_text()).get("ratios", [])
        ratios = [r for r in old if (r["model"], r["scheme"]) not in fresh] + ratios
    args.rerun_schemes = list(args.schemes)
    if args.merge:  # the written table covers every model and scheme it holds
        args.models = [m for m in MODELS if any(r["model"] == m for r in records)]
        args.schemes = [s for s in SCHEMES if any(r["scheme"] == s for r in records)]
        order = {(m, s): k for k, (m, s) in enumerate((m, s) for m in args.models for s in args.schemes)}
        ratios.sort(key=lambda r: order.get((r["model"], r["scheme"]), len(order)))
    write_results(records, ratios, args, time.perf_counter() - start)
    print(f"wrote {args.out / 'RESULTS.md'} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
