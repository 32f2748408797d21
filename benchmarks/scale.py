"""Scale benchmark: calibrate big VLMs from a disk-offloaded device map, across processes, and measure memory.

Writes ``benchmarks/results/scale.json`` (``{"runs": [...]}``, one record per row, see ``_record``) and
``benchmarks/results/SCALE.md``. Each row runs in its own process; peak RSS is read from the OS (VmHWM of
every process of the row, summed for torchrun rows) and the anonymous RSS is sampled every 0.1 s (file-backed
pages of mmapped safetensors would otherwise flatter or inflate it).

Models are random-weight checkpoints with real text shapes, written to disk tensor by tensor in bf16 (never
whole in memory), with a locally built processor whose images give hundreds of image tokens:

- ``llava-1b``: LLaVA with Llama-3.2-1B text shapes (hidden 2048, intermediate 8192, 16 layers, 32 heads,
  8 kv heads, vocab 128256), a small CLIP tower at 224 px / patch 14 (256 image tokens);
- ``qwen2vl-7b``: Qwen2-VL-7B text shapes (28 layers, hidden 3584, intermediate 18944, 28 heads, 4 kv heads,
  vocab 152064), a small vision tower at 448 px (256 image tokens);
- ``llava-1b-L{n}``: the llava-1b width at depth ``n`` (the depth sweep);
- ``qwen3vlmoe-30b-L{n}``: Qwen3-VL-30B-A3B text shapes (hidden 2048, 32 heads, 4 kv heads, 128 experts of
  intermediate 768, 8 active, vocab 151936; 1.2 GiB of bf16 experts per layer) at depth ``n`` (the MoE sweep;
  the full 48 layers are ~61 GB in bf16), a small Qwen3-VL vision tower at 448 px.

Usage::

    python benchmarks/scale.py --rows llava-1b-disk sweep          # default rows
    python benchmarks/scale.py --rows qwen2vl-7b-disk               # the 7B row: hours on 2 cores, resumable
    python benchmarks/scale.py --rows llava-1b-2proc
    python benchmarks/scale.py --rows moe-sweep                      # 2, 4, 8 MoE layers on disk
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import Measurement, now  # noqa: E402

#: the start of this command: records of one invocation share it (ratios are taken only between those)
INVOCATION = now()

RESULTS = HERE / "results"
MODELS_DIR = Path(os.environ.get("TLQ_SCALE_MODELS", Path(tempfile.gettempdir()) / "tlq-scale-models"))

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)
QWEN2VL_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
)
#: Qwen3-VL-30B-A3B's text shapes: every layer an MoE layer of 128 experts (intermediate 768), 8 active
QWEN3VL_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    max_position_embeddings=32768,
)
#: a small solve-bound model: Qwen2.5-0.5B's text shapes (intermediate 5.4x hidden), 8 layers
QWEN25_SMALL = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=8,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)
MODELS = {
    "llava-1b": dict(family="llava", text=LLAMA_1B, vocab=128256, image=224),
    "qwen2_5vl-small": dict(family="qwen2_5_vl", text=QWEN25_SMALL, vocab=151936, image=112),
    "qwen2vl-7b": dict(family="qwen2_vl", text=QWEN2VL_7B, vocab=152064, image=448),
    "qwen3vlmoe-30b": dict(family="qwen3_vl_moe", text=QWEN3VL_30B_A3B, vocab=151936, image=448),
}


def _spec_overrides(family: str, image: int) -> tuple[dict, dict, dict]:
    """(vision config, image processor, processor) overrides giving ``(image / 14)^2``-ish image tokens."""
    if family == "llava":
        return (
            dict(image_size=image, patch_size=14),
            dict(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
            dict(patch_size=14),
        )
    pixels = image * image
    return (
        dict(patch_size=14, spatial_merge_size=2),
        dict(patch_size=14, merge_size=2, min_pixels=pixels, max_pixels=pixels),
        {},
    )


def build_model(name: str, layers: int | None = None, seed: int = 0) -> Path:
    """Write the random-weight bf16 checkpoint and processor of ``name`` (``layers`` overrides depth)."""
    from tlq_hf.testing import tiny_models as tm

    spec_args = MODELS[name]
    text = dict(spec_args["text"])
    if layers is not None:
        text["num_hidden_layers"] = layers
    path = MODELS_DIR / f"{name}-L{text['num_hidden_layers']}"
    if (path / "model.safetensors.index.json").exists():
        return path
    vision, image_proc, proc_kwargs = _spec_overrides(spec_args["family"], spec_args["image"])
    spec = tm._FAMILY_SPECS[spec_args["family"]]
    image_cls, image_kwargs = spec.image_processor
    video = spec.video_processor
    if video is not None:
        video = (video[0], {**video[1], **{k: v for k, v in image_proc.items() if k in video[1]}})
    spec = dataclasses.replace(
        spec,
        image_processor=(image_cls, {**image_kwargs, **image_proc}),
        video_processor=video,
        processor_kwargs={**spec.processor_kwargs, **proc_kwargs},
    )
    tokenizer = tm._build_tokenizer(spec)
    processor = tm._build_processor(spec, tokenizer)
    config = tm._build_config(spec, tokenizer, text, vision)
    config.get_text_config(decoder=True).vocab_size = spec_args["vocab"]
    config.dtype = torch.bfloat16
    cls = tm._transformers_class(spec.model_class)
    with torch.device("meta"):
        meta = cls(config)
    path.mkdir(parents=True, exist_ok=True)
    _stream_random_weights(meta, path, seed)
    config.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _stream_random_weights(meta: torch.nn.Module, path: Path, seed: int, shard_bytes: int = 2 << 30) -> None:
    """N(0, 0.02) matrices, ones for norm weights, zeros for biases: written shard by shard in bf16."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, n = 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for key, t in meta.state_dict().items():
        if t.ndim >= 2:
            value = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
        elif key.endswith("bias"):
            value = torch.zeros(t.shape, dtype=torch.bfloat16)
        else:
            value = torch.ones(t.shape, dtype=torch.bfloat16)
        nbytes = value.numel() * 2
        if size + nbytes > shard_bytes:
            flush()
        shard[key] = value
        size += nbytes
    flush()
    total = sum(meta.state_dict()[k].numel() * 2 for k in index)
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=1)


# ----------------------------------------------------------------------------------------- worker side
class _AnonPeak(logging.Handler):
    """Samples RssAnon of this process every 0.1 s, overall and per phase, and keeps each phase's exact peak RSS.

    The phase is ``load`` until tlq_hf logs ``tlq_hf: <phase>: ...`` (capture, importance, layers); callers
    name the phases that follow (``mark``). At each phase change the kernel's high-water mark (VmHWM, file pages
    included) is read for the phase that ends and reset (``/proc/self/clear_refs``), so a peak reached while
    transformers loads the checkpoint is told apart from one reached while calibrating.
    """

    PHASES = ("capture", "importance", "layers")

    def __init__(self, progress: str | None = None) -> None:
        super().__init__(logging.INFO)
        self.peak = 0
        self.phase = "load"
        self.phase_peaks: dict[str, int] = {}
        self.phase_hwm: dict[str, int] = {}
        # resumable rows: elapsed seconds per phase and the peaks so far, rewritten every few seconds to
        # ``progress`` so that a segment killed before it finishes still counts (see run_row)
        self.progress = progress
        self.start = self._since = time.perf_counter()
        self.phase_seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        logging.getLogger("tlq_hf").addHandler(self)
        logging.getLogger("tlq_hf").setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        for phase in self.PHASES:
            if record.getMessage().startswith(f"tlq_hf: {phase}:"):
                self.mark(phase)

    def mark(self, phase: str) -> None:
        self._sample()
        self._close_hwm()
        now = time.perf_counter()
        self.phase_seconds[self.phase] = self.phase_seconds.get(self.phase, 0.0) + now - self._since
        self.phase, self._since = phase, now

    def _sample(self) -> None:
        anon = _status_kb("RssAnon") * 1024
        self.peak = max(self.peak, anon)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), anon)

    def _close_hwm(self) -> None:
        """Fold VmHWM into the current phase's peak and reset the high-water mark to the present RSS."""
        self.phase_hwm[self.phase] = max(self.phase_hwm.get(self.phase, 0), _status_kb("VmHWM") * 1024)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux, or not permitted: VmHWM then stays the whole-process peak
            pass

    def peak_rss(self) -> int:
        """Peak RSS of the process so far (the largest phase high-water mark, the current one included)."""
        return max([_status_kb("VmHWM") * 1024, *self.phase_hwm.values()])

    def hwm_by_phase(self) -> dict[str, int]:
        out = dict(self.phase_hwm)
        out[self.phase] = max(out.get(self.phase, 0), _status_kb("VmHWM") * 1024)
        return out

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._sample()
            if self.progress is not None and time.perf_counter() - last > 5:
                self.write_progress()
                last = time.perf_counter()
            time.sleep(0.1)

    def write_progress(self) -> None:
        now = time.perf_counter()
        phases = dict(self.phase_seconds)
        phases[self.phase] = phases.get(self.phase, 0.0) + now - self._since
        state = {
            "elapsed_s": now - self.start,
            "phase_seconds": phases,
            "peak_rss_bytes": self.peak_rss(),
            "peak_anon_rss_bytes": self.peak,
            "phase_peak_anon_rss_bytes": dict(self.phase_peaks),
            "phase_peak_rss_bytes": self.hwm_by_phase(),
        }
        tmp = f"{self.progress}.tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, self.progress)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.progress is not None:
            self.mark("done")
            self.write_progress()
        logging.getLogger("tlq_hf").removeHandler(self)
        return self.peak


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _tensors_digest(folder: Path) -> str:
    """SHA-256 over every tensor of the safetensors files in ``folder`` (names, dtypes, shapes, bytes; sorted)."""
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _worker(job: dict) -> dict:
    import torch.distributed as dist
    from accelerate import init_empty_weights

    from tlq_hf import TLQConfig
    from tlq_hf.arch import decoder_device_map
    from tlq_hf.testing.tiny_models import load_auto_class, sample_rows

    anon = _AnonPeak(job.get("progress"))
    start = time.perf_counter()
    cls = load_auto_class()
    path = job["path"]
    work = Path(job["work"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    kwargs: dict = {"dtype": torch.bfloat16}
    if job["offload"] != "none":
        with init_empty_weights():
            meta = cls.from_config(config)
        # offloaded rows put everything (embeddings, head, vision tower) where the decoder goes
        kwargs["device_map"] = decoder_device_map(meta, decoder=job["offload"], rest=job["offload"])
        kwargs["offload_folder"] = str(work / "weights")
    cfg = TLQConfig(
        method=job.get("method", "tlq"),
        bits=4,
        group_size=128,
        dataset=sample_rows(job["samples"], size=job["image"]),
        num_samples=job["samples"],
        max_length=4096,
        offload_dir=str(work / "acts") if job["offload"] == "disk" else None,
        checkpoint_dir=str(work / "checkpoint") if job.get("progress") else None,
    )
    model = cls.from_pretrained(path, quantization_config=cfg, **kwargs)
    report = model.tlq_report
    wall = time.perf_counter() - start
    rank = dist.get_rank() if dist.is_initialized() else 0
    digest = None
    if rank == 0 and job.get("save"):
        anon.mark("save")
        model.save_pretrained(work / "out")
        digest = _tensors_digest(work / "out")
    return {
        "rank": rank,
        "checkpoint_sha256": digest,
        "compute_dtype": report.compute_dtype,
        "wall_s": wall,
        "calibration_s": report.seconds,
        "io_s": report.io_seconds,
        "phases": report.phases,
        "tokens": report.tokens,
        "samples": report.samples,
        "layer_seconds": [r.seconds for r in report.layers],
        "layer_phases": [r.phases for r in report.layers],
        "expert_tokens": [t for r in report.layers for ts in r.expert_tokens.values() for t in ts],
        "expert_fallbacks": sum(len(r.fallbacks) for r in report.layers),
        "peak_rss_bytes": anon.peak_rss(),
        "phase_peak_rss_bytes": anon.hwm_by_phase(),
        "peak_anon_rss_bytes": anon.stop(),
        "phase_peak_anon_rss_bytes": anon.phase_peaks,
        "maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _worker_llmc(job: dict) -> dict:
    """llm-compressor GPTQ W4A16 through ``oneshot`` on the same rows, sequential decoder layers, the model loaded in
    ``job["dtype"]`` (bf16 by default; its layers compute in that dtype)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoProcessor

    from tlq_hf.arch import find_decoder_stack
    from tlq_hf.data import build_calibration_set
    from tlq_hf.testing.tiny_models import load_auto_class, sample_rows

    anon = _AnonPeak()
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(job["path"])
    samples = build_calibration_set(sample_rows(job["samples"], size=job["image"]), processor, job["samples"], 4096)
    ds = Dataset.from_list([{k: v.tolist() for k, v in s.inputs.items()} for s in samples])
    dtypes = {k: v.dtype for k, v in samples[0].inputs.items()}

    def collate(batch):
        return {k: torch.tensor(v, dtype=dtypes[k]) for k, v in batch[0].items()}

    cls, dtype = load_auto_class(), getattr(torch, job.get("dtype", "bfloat16"))
    if job["offload"] == "disk":  # the peer's own offloading: compressed-tensors' loader, a CPU budget, disk beyond
        from compressed_tensors.offload import load_offloaded_model

        with load_offloaded_model(cls):
            model = cls.from_pretrained(
                job["path"],
                dtype=dtype,
                device_map="auto_offload",
                max_memory={"cpu": LLMC_CPU_BUDGET},
                offload_folder=str(Path(job["work"]) / "weights"),
            )
    else:
        model = cls.from_pretrained(job["path"], dtype=dtype)
    ignore = ["re:.*lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    layer_class = type(find_decoder_stack(model).layers[0]).__name__
    t0 = time.perf_counter()
    anon.mark("oneshot")
    oneshot(
        model=model,
        sequential_targets=[layer_class],
        dataset=ds,
        recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore),
        num_calibration_samples=job["samples"],
        max_seq_length=4096,
        data_collator=collate,
        processor=processor,
    )
    oneshot_s = time.perf_counter() - t0
    return {
        "rank": 0,
        "wall_s": time.perf_counter() - start,
        "calibration_s": oneshot_s,
        "phases": {"oneshot": oneshot_s},
        "tokens": sum(s.num_tokens for s in samples),
        "samples": len(samples),
        "layer_seconds": [],
        "peak_rss_bytes": anon.peak_rss(),
        "phase_peak_rss_bytes": anon.hwm_by_phase(),
        "peak_anon_rss_bytes": anon.stop(),
        "phase_peak_anon_rss_bytes": anon.phase_peaks,
        "maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# ----------------------------------------------------------------------------------------- parent side
def _checkpoint_stats(path: Path) -> dict:
    from transformers import AutoConfig

    index = json.loads((path / "model.safetensors.index.json").read_text())
    text = AutoConfig.from_pretrained(path).get_text_config(decoder=True)
    from safetensors import safe_open

    params = 0
    layer0 = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                params += n
                if ".layers.0." in key and "vision" not in key and "visual" not in key:
                    layer0 += n
    layer_bytes = layer0 * 2
    return {
        "params": params,
        "bf16_bytes": params * 2,
        "layers": text.num_hidden_layers,
        "layer_bf16_bytes": layer_bytes,
    }


class _MemoryGroup:
    """A cgroup-v1 memory group under this process's own, with a limit; ``join`` runs in the child before exec."""

    def __init__(self, limit: int) -> None:
        own = next(
            line.split(":", 2)[2].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.split(":")[1] == "memory"
        )
        self.limit = limit
        self.path = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"tlq-scale-{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def readings(self) -> dict:
        def read(name: str) -> int:
            return int((self.path / name).read_text())

        return {
            "memory_limit_bytes": self.limit,
            "cgroup_peak_bytes": read("memory.max_usage_in_bytes"),
            "cgroup_limit_hits": read("memory.failcnt"),
        }


@contextlib.contextmanager
def _memory_group(limit: int):
    """Yield a :class:`_MemoryGroup` of ``limit`` bytes; removed (empty by then) on exit."""
    if not Path("/sys/fs/cgroup/memory").is_dir():
        raise RuntimeError("memory_limit needs cgroup v1's memory controller at /sys/fs/cgroup/memory")
    group = _MemoryGroup(limit)
    try:
        yield group
    finally:
        group.path.rmdir()


#: the CPU memory llm-compressor's own offloading may fill before it offloads to disk (its "leanest" row)
LLMC_CPU_BUDGET = 512 << 20

PEER_PYTHON = HERE.parent / ".venv-peers" / "bin" / "python"


def run_row(
    name: str,
    model: str,
    offload: str,
    processes: int,
    samples: int,
    layers: int | None = None,
    library: str = "tlq_hf",
    resumable: bool = False,
    threads: int | None = None,
    memory_limit: int | None = None,
    method: str = "tlq",
    dtype: str = "bfloat16",
    save: bool = False,
) -> dict:
    """Run one row in its own process(es) and return its record (``save``: rank 0 saves the quantized model and the
    record holds its tensors' ``checkpoint_sha256``).

    A ``resumable`` row (longer than a working session) calibrates with ``checkpoint_dir`` in a persistent
    folder, ``MODELS_DIR/runs/<name>``: run the same command again after the process was killed and it
    continues from the last finished layer. Each run of it is a segment; the row's wall time and phase times
    are summed over segments (from the progress file each segment rewrites every few seconds), its peaks
    are the largest of any segment.

    ``method`` is tlq_hf's method (``"tlq"``, ``"gptq"``, ...); ``dtype`` the dtype an llm-compressor row loads
    and computes in (``"bfloat16"`` or ``"float32"``; tlq_hf loads bf16 and computes each layer in fp32).

    With ``memory_limit`` (bytes) the row's processes run in a cgroup-v1 memory group of that limit: the kernel
    reclaims page cache to stay under it and kills the row if its allocations alone do not fit. The record then
    holds the group's own peak (``cgroup_peak_bytes``, page cache included) and how often it hit the limit.
    """
    path = build_model(model, layers)
    stats = _checkpoint_stats(path)
    measured = Measurement("python benchmarks/scale.py --rows " + name)
    with contextlib.ExitStack() as stack:
        if resumable:
            work = str(MODELS_DIR / "runs" / name)
            shutil.rmtree(Path(work) / "acts", ignore_errors=True)  # a killed segment's spilled activations
            Path(work).mkdir(parents=True, exist_ok=True)
            segment = len(list(Path(work).glob("progress-*.json")))
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="tlq-scale-"))
        job = {"path": str(path), "work": work, "offload": offload, "samples": samples, "image": MODELS[model]["image"]}
        job["library"], job["method"], job["dtype"], job["save"] = library, method, dtype, save
        if resumable:
            job["progress"] = str(Path(work) / f"progress-{segment:03d}.json")
        script = [str(Path(__file__).resolve()), "--worker", json.dumps(job)]
        env = dict(os.environ)
        if threads is not None:  # torch threads per process (torchrun's default is 1 per rank)
            env["OMP_NUM_THREADS"] = str(threads)
        if library == "llm-compressor":
            if not PEER_PYTHON.exists():
                raise RuntimeError(f"no {PEER_PYTHON}: create it as benchmarks/PEERS.md says")
            cmd = [str(PEER_PYTHON), *script]
            env["PYTHONPATH"] = str(HERE.parent / "src")
        elif processes > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
            cmd += script
        else:
            cmd = [sys.executable, *script]
        group = stack.enter_context(_memory_group(memory_limit)) if memory_limit else None
        popen = {"preexec_fn": group.join} if group else {}
        start = time.perf_counter()
        if resumable:  # hours: its log (progress bars, per-layer errors) is followed in the run folder
            log = Path(work) / f"log-{segment:03d}.txt"
            with open(log, "w") as err:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, **popen)
            proc.stderr = log.read_text()
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, **popen)
        wall = time.perf_counter() - start
        limited = group.readings() if group else {}
    if proc.returncode != 0:
        raise RuntimeError(f"row {name} failed:\n{proc.stderr[-4000:]}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    main = next(r for r in results if r["rank"] == 0)
    record = {
        **measured.record(),
        "invocation": INVOCATION,
        "name": name,
        "library": library,
        "method": method if library == "tlq_hf" else "gptq",
        "dtype": dtype if library == "llm-compressor" else f"bfloat16 ({main.get('compute_dtype')} per layer)",
        "model": model if layers is None else f"{model}-L{layers}",
        "layers": stats["layers"],
        "params": stats["params"],
        "bf16_bytes": stats["bf16_bytes"],
        "samples": main["samples"],
        "tokens": main["tokens"],
        "offload": offload,
        "processes": processes,
        "wall_s": round(wall, 2),
        "peak_rss_bytes": sum(r["peak_rss_bytes"] for r in results),
        "peak_anon_rss_bytes": sum(r["peak_anon_rss_bytes"] for r in results),
        "phase_peak_anon_rss_bytes": main.get("phase_peak_anon_rss_bytes", {}),
        "phase_peak_rss_bytes": main.get("phase_peak_rss_bytes", {}),
        "phases": {k: round(v, 2) for k, v in main["phases"].items()},
        "io_s": round(main.get("io_s", 0.0), 2),
        "layer_seconds": [round(s, 2) for s in main["layer_seconds"]],
        "layer_bf16_bytes": stats["layer_bf16_bytes"],
    }
    for key in ("layer_phases", "expert_tokens", "expert_fallbacks", "checkpoint_sha256"):
        if key in main:
            record[key] = main[key]
    record.update(limited)
    if threads is not None:
        record["threads"] = threads
    if resumable:
        record.update(_segments(Path(work)))
        shutil.rmtree(work)
    return record


def _segments(work: Path) -> dict:
    """Wall time, phase times and peaks of a resumable row, combined over its segments' progress files."""
    parts = [json.loads(f.read_text()) for f in sorted(work.glob("progress-*.json"))]
    phases: dict[str, float] = {}
    phase_peaks: dict[str, int] = {}
    phase_hwm: dict[str, int] = {}
    for part in parts:
        for k, v in part["phase_seconds"].items():
            if k != "done":
                phases[k] = round(phases.get(k, 0.0) + v, 2)
        for k, v in part["phase_peak_anon_rss_bytes"].items():
            phase_peaks[k] = max(phase_peaks.get(k, 0), v)
        for k, v in part.get("phase_peak_rss_bytes", {}).items():
            phase_hwm[k] = max(phase_hwm.get(k, 0), v)
    out = {
        "segments": len(parts),
        "wall_s": round(sum(p["elapsed_s"] for p in parts), 2),
        "phases": phases,
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in parts),
        "peak_anon_rss_bytes": max(p["peak_anon_rss_bytes"] for p in parts),
        "phase_peak_anon_rss_bytes": phase_peaks,
        "phase_peak_rss_bytes": phase_hwm,
    }
    if len(parts) > 1:
        out["note"] = (
            f"ran in {len(parts)} segments (each killed segment resumed from checkpoint_dir by rerunning the "
            "command); wall and phase seconds are summed over segments (the worker's elapsed time, including "
            "each segment's reload, capture and restore), peaks are the largest of any segment"
        )
    return out


#: (suffix, offload, run_row keywords) of the side-by-side rows (issue 28, item 3): llm-compressor GPTQ computing in
#: bf16 and in fp32 in RAM, and in bf16 from its own offloading (512 MiB of CPU, the rest on disk); tlq_hf TLQ and
#: plain GPTQ disk-offloaded, TLQ in RAM
PEER_VARIANTS = (
    ("llmc-bf16", "none", dict(library="llm-compressor", dtype="bfloat16")),
    ("llmc-fp32", "none", dict(library="llm-compressor", dtype="float32")),
    ("llmc-bf16-disk", "disk", dict(library="llm-compressor", dtype="bfloat16")),
    ("tlq-disk", "disk", dict(method="tlq")),
    ("gptq-disk", "disk", dict(method="gptq")),
    ("tlq-ram", "none", dict(method="tlq")),
)


def _peer_rows(prefix: str, layers: int | None, variants) -> list[dict]:
    """The side-by-side rows ``prefix-<suffix>`` on the 1B LLaVA (``layers`` of it; its 128k vocabulary), each in its
    own process, back to back in this invocation."""
    return [
        {
            **run_row(f"{prefix}-{suffix}", "llava-1b", offload, 1, 16, layers=layers, **kw),
            "command": f"python benchmarks/scale.py --rows {prefix}",
        }
        for suffix, offload, kw in variants
    ]


THREADS_CMD = "python benchmarks/scale.py --rows threads"
SWEEP_CMD = "python benchmarks/scale.py --rows sweep"
PROCS_CMD = "python benchmarks/scale.py --rows procs"
MOE_SWEEP_CMD = "python benchmarks/scale.py --rows moe-sweep"
ROWS = {
    "llava-1b-disk": lambda: [run_row("llava-1b-disk", "llava-1b", "disk", 1, 16)],
    "llava-1b-cpu": lambda: [run_row("llava-1b-cpu", "llava-1b", "none", 1, 16)],
    "llava-1b-llmc": lambda: [run_row("llava-1b-llmc", "llava-1b", "none", 1, 16, library="llm-compressor")],
    "llava-1b-2proc": lambda: [run_row("llava-1b-2proc", "llava-1b", "disk", 2, 16)],
    "qwen2vl-7b-disk": lambda: [run_row("qwen2vl-7b-disk", "qwen2vl-7b", "disk", 1, 8, resumable=True)],
    # processes x torch threads per process on the 2-layer llava-1b: is a second process worth a core?
    "threads": lambda: [
        {**run_row(f"threads-{p}x{t}", "llava-1b", "disk", p, 16, layers=2, threads=t), "command": THREADS_CMD}
        for p, t in ((1, 2), (1, 1), (2, 1))
    ],
    # processes x threads on small solve-bound work (issue 28, item 6): one process on one core, two on one each,
    # one on both; 8 rows of a few dozen tokens each
    "procs": lambda: [
        {**run_row(f"procs-{p}x{t}", "qwen2_5vl-small", "none", p, 8, threads=t, save=True), "command": PROCS_CMD}
        for p, t in ((1, 1), (2, 1), (1, 2))
    ],
    "sweep": lambda: [
        {**run_row(f"sweep-L{n}", "llava-1b", "disk", 1, 8, layers=n), "sweep": "llava-1b-width", "command": SWEEP_CMD}
        for n in (2, 4, 8)
    ],
    "moe-sweep": lambda: [
        {
            **run_row(f"moe-sweep-L{n}", "qwen3vlmoe-30b", "disk", 1, 16, layers=n),
            "sweep": "qwen3vlmoe-30b-width",
            "command": MOE_SWEEP_CMD,
        }
        for n in (2, 4, 8)
    ],
    # peers at their best, side by side on the 2-layer llava-1b (128k vocabulary): llm-compressor GPTQ computing in
    # bf16 and in fp32 in RAM, and in bf16 from its own offloading (512 MiB of CPU, the rest on disk), tlq_hf TLQ and
    # plain GPTQ disk-offloaded, TLQ in RAM (issue 28, item 3)
    "peers-l2": lambda: _peer_rows("peers-l2", 2, PEER_VARIANTS),
    # the full 16-layer 1B model: llm-compressor's fastest configuration of peers-l2 beside tlq_hf's TLQ and plain GPTQ
    # disk-offloaded, and TLQ in RAM (the like-for-like memory comparison with an in-RAM peer)
    "peers-1b": lambda: _peer_rows("peers-1b", None, [v for v in PEER_VARIANTS if v[0] != "llmc-fp32"]),
    # the deepest sweep row again, in a 6 GB memory group: does calibration need the page cache the load leaves?
    "moe-limited": lambda: [
        {
            **run_row("moe-limited-L8", "qwen3vlmoe-30b", "disk", 1, 16, layers=8, memory_limit=6 * 10**9),
            "command": "python benchmarks/scale.py --rows moe-limited",
        }
    ],
}


MOE_BEGIN, MOE_END = "<!-- moe-scale -->", "<!-- /moe-scale -->"
#: README blocks scale.py writes from its records
BLOCKS = {
    "moe": (MOE_BEGIN, MOE_END),
    "peers-l2": ("<!-- peers-l2 -->", "<!-- /peers-l2 -->"),
    "peers-1b": ("<!-- peers-1b -->", "<!-- /peers-1b -->"),
    "sweep": ("<!-- sweep -->", "<!-- /sweep -->"),
    "procs": ("<!-- procs -->", "<!-- /procs -->"),
    "7b": ("<!-- 7b -->", "<!-- /7b -->"),
}


def write(records: list[dict]) -> None:
    """Merge ``records`` into ``results/scale.json`` (a row's new record replaces its old one) and regenerate
    ``results/SCALE.md`` and the README's MoE block from all records."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "scale.json"
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    names = {r["name"] for r in records}
    runs = [r for r in old if r["name"] not in names] + records
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (RESULTS / "SCALE.md").write_text(scale_markdown(runs))
    readme = HERE.parent / "README.md"
    for key, block in readme_blocks(runs).items():
        begin, end = BLOCKS[key]
        text = readme.read_text()
        if block and begin in text:
            head, rest = text.split(begin, 1)
            readme.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")


def readme_blocks(runs: list[dict]) -> dict[str, str]:
    """The text of every README block (:data:`BLOCKS`) generated from the records ``runs`` ("" before its rows ran)."""
    blocks = {"moe": moe_sweep_block(runs), **{key: peers_block(runs, key) for key in ("peers-l2", "peers-1b")}}
    return {**blocks, "sweep": sweep_block(runs), "procs": procs_block(runs), "7b": big_block(runs)}


def _contention(r: dict) -> str:
    """Whether other work shared the cores during row ``r``, and how much (its share of the machine's CPU time)."""
    if not r.get("contended"):
        return "not contended"
    share = r["other_cpu_s"] / (r["cpus"] * r["wall_s"])
    return f"contended: other processes used {share:.1%} of the CPU time, so its wall time is an upper bound"


def big_block(runs: list[dict]) -> str:
    """The README's 7B-shaped row (``qwen2vl-7b-disk``: every layer on disk), from its record ("" for a record
    without provenance)."""
    r = next((r for r in runs if r["name"] == "qwen2vl-7b-disk"), None)
    if r is None or "commit" not in r:
        return ""
    gb, ph = 1e9, r["phases"]
    layers = ph.get("layers", 0.0)
    return (
        f"`{r['command']}` (record `qwen2vl-7b-disk` in `benchmarks/results/scale.json`, commit {r['commit'][:7]}, "
        f"{r['cpu']}, {r['cpus']} cores, {_contention(r)}): Qwen2-VL-7B "
        f"text shapes ({r['layers']} layers, hidden 3584, intermediate 18944, vocab 152064, "
        f"{r['params'] / 1e9:.1f} B params, {r['bf16_bytes'] / gb:.1f} GB bf16 written tensor by tensor and never "
        f"whole in RAM; {r['samples']} real-photo rows, {r['tokens']} tokens), every layer offloaded to disk, TLQ "
        f"W4A16-g128 with its gradient pass: **{r['wall_s']:.0f} s** (capture {ph.get('capture', 0):.0f} / importance "
        f"{ph.get('importance', 0):.0f} / layers {layers:.0f} s, {layers / r['layers']:.0f} s per layer; I/O "
        f"{r.get('io_s', 0):.0f} s in all), **peak RSS {r['peak_rss_bytes'] / gb:.2f} GB = "
        f"{r['peak_rss_bytes'] / r['bf16_bytes']:.2f}x the bf16 model** (target <= 0.4x), peak anonymous "
        f"{r['peak_anon_rss_bytes'] / gb:.2f} GB."
    )


def procs_block(runs: list[dict]) -> str:
    """The README's processes x threads table on small solve-bound work (``procs``: one invocation), each row's time
    against one process on one core, and whether its checkpoint equals that process's."""
    rows = [r for r in runs if r["name"].startswith("procs-")]
    base = next((r for r in rows if r["name"] == "procs-1x1"), None)
    if base is None or len({_invocation(r) for r in rows}) > 1:
        return ""
    lines = [
        f"`{base['command']}` (records `procs-*`, commit {base['commit'][:7]}, one invocation"
        f"{', none contended' if not any(r.get('contended') for r in rows) else ', some rows contended'}): "
        f"{base['model']}, {base['samples']} rows / {base['tokens']} tokens, TLQ W4A16-g128 in RAM.",
        "",
        "| processes x threads | calibration | x 1 x 1 | importance | layers | wall | x 1 x 1 | checkpoint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = r.get("checkpoint_sha256") is not None and r.get("checkpoint_sha256") == base.get("checkpoint_sha256")
        lines.append(
            f"| {r['processes']} x {r.get('threads', '?')} (`{r['name']}`) | {_calibration_s(r):.1f} s | "
            f"{_calibration_s(r) / _calibration_s(base):.2f}x | {r['phases'].get('importance', 0):.1f} s | "
            f"{r['phases'].get('layers', 0):.1f} s | {r['wall_s']:.1f} s | {r['wall_s'] / base['wall_s']:.2f}x | "
            f"{'= 1 x 1' if same else 'differs (another thread count: other BLAS rounding)'} |"
        )
    return "\n".join(lines)


def _calibration_s(record: dict) -> float:
    """Seconds the report's phases took (capture, importance, layers): calibration without start-up and load."""
    return sum(record["phases"].values())


def sweep_block(runs: list[dict]) -> str:
    """The README's dense depth sweep (``sweep``: the llava-1b width at 2, 4, 8 layers, disk-offloaded)."""
    rows = _sweep("llava-1b-width", runs)
    if len(rows) < 2 or "commit" not in rows[0]:
        return ""
    gib = 1 << 30
    peaks = " / ".join(f"{r['peak_rss_bytes'] / gib:.2f}" for r in rows)
    return (
        f"`{rows[0]['command']}` (records `sweep-L*`, commit {rows[0]['commit'][:7]}, one invocation"
        f"{', none contended' if not any(r.get('contended') for r in rows) else ', some rows contended'}): the "
        "llava-1b width at "
        f"{', '.join(str(r['layers']) for r in rows)} layers, disk offload, {rows[0]['samples']} rows, TLQ: peak RSS "
        f"{peaks} GiB. {sweep_growth('llava-1b-width', runs)} (target <= 0.35x)"
    )


def peers_block(runs: list[dict], prefix: str = "peers-l2") -> str:
    """The README's side-by-side table of the ``prefix`` invocation (``peers-l2``, ``peers-1b``; "" when it has not
    run): each row's time and memory, and ratios to the fastest llm-compressor row and to tlq_hf's plain GPTQ of
    the same invocation."""
    rows = [r for r in runs if r["name"].startswith(prefix + "-")]
    if not rows or len({_invocation(r) for r in rows}) > 1:
        return ""
    gb = 1e9
    peers = [r for r in rows if r["library"] == "llm-compressor"]
    peer = min(peers, key=lambda r: r["wall_s"])
    lean = min(peers, key=lambda r: r["peak_rss_bytes"])
    gptq = next(r for r in rows if r["name"] == f"{prefix}-gptq-disk")
    first = rows[0]
    sliced = first["model"] != "llava-1b"  # run_row names a model cut to fewer layers "<model>-L<layers>"
    lines = [
        f"`{first['command']}` (records `{prefix}-*` in `benchmarks/results/scale.json`, commit {first['commit'][:7]}, "
        f"{first['cpu']}{' with ' + ', '.join(first['cpu_flags']) if first.get('cpu_flags') else ''}, "
        f"{first['cpus']} cores, one invocation, "
        f"each row in its own process{', none contended' if not any(r.get('contended') for r in rows) else ''}): "
        f"{'the ' + str(first['layers']) + '-layer slice of the' if sliced else 'the full'} 1B LLaVA "
        f"({'' if sliced else str(first['layers']) + ' layers, '}its 128k vocabulary), {first['samples']} rows / "
        f"{first['tokens']} tokens, "
        "W4 g128, bf16 checkpoint.",
        "",
        "| row | library, method | compute | offload | wall | phases | x fastest peer | x plain GPTQ | peak RSS "
        "(x fastest peer's) | peak anon |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phases = " / ".join(f"{k} {v:.0f}" for k, v in r["phases"].items())
        lines.append(
            f"| `{r['name']}` | {r['library']} {r['method']} | {r['dtype']} | {r['offload']} | {r['wall_s']:.1f} s "
            f"| {phases} | {r['wall_s'] / peer['wall_s']:.2f}x | {r['wall_s'] / gptq['wall_s']:.2f}x "
            f"| {r['peak_rss_bytes'] / gb:.2f} GB ({r['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x) "
            f"| {r['peak_anon_rss_bytes'] / gb:.2f} GB |"
        )
    tlq = next(r for r in rows if r["name"] == f"{prefix}-tlq-disk")
    lines += ["", "Per layer, means over layers (seconds): " + "; ".join(_per_layer(r) for r in (gptq, tlq)) + "."]
    lines += [
        "",
        f"Against llm-compressor's fastest configuration here ({peer['dtype']} compute): TLQ (gradient pass included, "
        f"disk-offloaded) takes {tlq['wall_s'] / peer['wall_s']:.2f}x its time (target <= 1.0x) and plain GPTQ "
        f"{gptq['wall_s'] / peer['wall_s']:.2f}x (target <= 0.7x), at "
        f"{tlq['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x its peak RSS (target <= 0.6x); TLQ / plain GPTQ = "
        f"{tlq['wall_s'] / gptq['wall_s']:.2f}x (target <= 1.3x)."
        + (
            ""
            if lean is peer
            else f" Against llm-compressor's leanest configuration (`{lean['name']}`, {lean['wall_s']:.1f} s, "
            f"{lean['wall_s'] / peer['wall_s']:.2f}x the fastest's time) TLQ's peak RSS is "
            f"{tlq['peak_rss_bytes'] / lean['peak_rss_bytes']:.2f}x."
        ),
    ]
    return "\n".join(lines)


def _per_layer(record: dict) -> str:
    """``name`` total = statistics + solves + output (means over layers), and its gradient pass if it has one."""
    m = _mean_phases(record)
    total = sum(m.get(k, 0.0) for k in ("onload", "statistics", "solve", "output", "settle"))
    text = (
        f"`{record['name']}` {total:.1f} = statistics {m['statistics']:.1f} + solves {m['solve']:.1f} + "
        f"output {m['output']:.1f}"
    )
    if "importance" in record["phases"]:
        text += f", plus the gradient pass {record['phases']['importance']:.0f} for all {record['layers']} layers"
    return text


def scale_markdown(runs: list[dict]) -> str:
    """``results/SCALE.md`` for the records ``runs``."""
    gib = 1 << 30
    lines = [
        "# Scale benchmark",
        "",
        "Random-weight VLMs with real text shapes, bf16 on disk, TLQ W4A16-g128 (gradient pass included),",
        "2-core CPU machine. Peak RSS: VmHWM of the row's processes (summed over ranks); anon: peak RssAnon.",
        "",
        "| row | model | layers | bf16 GiB | samples / tokens | offload | procs | wall s | peak RSS GiB (x bf16) "
        "| peak anon GiB | phases s | of which I/O s | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ph = r.get("phases", {})
        io = f"{r['io_s']:.0f}" if "io_s" in r else "-"
        phases = " / ".join(f"{k} {v:.0f}" for k, v in ph.items())
        lines.append(
            f"| {r['name']} | {r['model']} | {r['layers']} | {r['bf16_bytes'] / gib:.2f} | {r['samples']} / "
            f"{r['tokens']} | {r['offload']} | {r['processes']} | {r['wall_s']:.0f} | "
            f"{r['peak_rss_bytes'] / gib:.2f} ({r['peak_rss_bytes'] / r['bf16_bytes']:.2f}x) | "
            f"{r.get('peak_anon_rss_bytes', 0) / gib:.2f} | {phases} | {io} | `{r['command']}` |"
        )
    phased = [r for r in runs if r.get("phase_peak_anon_rss_bytes")]
    if phased:
        names = list(dict.fromkeys(k for r in phased for k in r["phase_peak_anon_rss_bytes"]))
        lines += ["", "Peak anonymous RSS (GiB) by phase:", "", "| row | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---|" * len(names))
        for r in phased:
            peaks = r["phase_peak_anon_rss_bytes"]
            cells = [f"{peaks[k] / gib:.2f}" if k in peaks else "" for k in names]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    notes = [f"- {r['name']}: {r['note']}" for r in runs if r.get("note")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    for name in dict.fromkeys(r["sweep"] for r in runs if r.get("sweep")):
        lines += ["", sweep_growth(name, runs)]
    return "\n".join(lines) + "\n"


def _invocation(record: dict) -> object:
    """Which command run made ``record`` (older records: their command at their commit)."""
    return record.get("invocation") or (record.get("command"), record.get("commit"))


def _sweep(name: str, runs: list[dict]) -> list[dict]:
    return sorted((r for r in runs if r.get("sweep") == name), key=lambda r: r["layers"])


def calibration_peak(record: dict) -> int | None:
    """Peak RSS (VmHWM, file pages included) while tlq_hf calibrates: capture, importance and layer loop, not the
    checkpoint load before them (``None`` for records without per-phase high-water marks)."""
    hwm = record.get("phase_peak_rss_bytes") or {}
    peaks = [v for k, v in hwm.items() if k in _AnonPeak.PHASES]
    return max(peaks) if peaks else None


def sweep_growth(name: str, runs: list[dict]) -> str:
    """One line: how peak RSS (whole run, and calibration alone where recorded) grows per added layer over the
    depth sweep ``name``."""
    sweep = _sweep(name, runs)
    if len(sweep) < 2:
        return ""
    if len({_invocation(r) for r in sweep}) > 1:
        return f"Depth sweep {name}: its records come from different invocations, so no growth is computed."
    a, b = sweep[0], sweep[-1]
    one = a["layer_bf16_bytes"]

    def growth(before: int, after: int) -> str:
        per_layer = (after - before) / (b["layers"] - a["layers"])
        return f"{per_layer / 2**20:.1f} MiB per added layer = {per_layer / one:.3f}x one layer's bf16 bytes"

    line = (
        f"Depth sweep {name} ({a['layers']} -> {b['layers']} layers, one layer {one / 2**20:.0f} MiB in bf16): "
        f"peak RSS grows {growth(a['peak_rss_bytes'], b['peak_rss_bytes'])}"
    )
    ca, cb = calibration_peak(a), calibration_peak(b)
    if ca is not None and cb is not None:
        line += f"; while calibrating it grows {growth(ca, cb)}"
    return line + "."


def _mean_phases(record: dict) -> dict[str, float]:
    layers = record.get("layer_phases") or []
    keys = dict.fromkeys(k for p in layers for k in p)
    return {k: sum(p.get(k, 0.0) for p in layers) / max(1, len(layers)) for k in keys}


def moe_sweep_block(runs: list[dict]) -> str:
    """The README's MoE scale table, from the ``moe-sweep`` records ("" when there are none)."""
    sweep = _sweep("qwen3vlmoe-30b-width", runs)
    if not sweep:
        return ""
    gb, first = 1e9, sweep[0]
    tokens = first["expert_tokens"]
    rows = [
        "| layers | bf16 on disk | wall | importance | layer loop | per layer | statistics (in experts) | solves "
        "(experts) | output | peak RSS: load | peak RSS: calibration (x bf16) | peak anon | expert fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sweep:
        ph, lp = r["phases"], _mean_phases(r)
        per_layer = sum(r["layer_seconds"]) / len(r["layer_seconds"]) if r.get("layer_seconds") else ph["layers"]
        rows.append(
            f"| {r['layers']} | {r['bf16_bytes'] / gb:.1f} GB | {r['wall_s']:.0f} s{'*' if r.get('contended') else ''} "
            f"| {ph.get('importance', 0):.0f} s "
            f"| {ph['layers']:.0f} s | {per_layer:.0f} s | {lp['statistics']:.0f} s ({lp['experts_forward']:.0f} s) "
            f"| {lp['solve']:.0f} s ({lp['experts_solve']:.0f} s) | {lp['output']:.0f} s "
            f"| {r['phase_peak_rss_bytes']['load'] / gb:.2f} GB "
            f"| {calibration_peak(r) / gb:.2f} GB ({calibration_peak(r) / r['bf16_bytes']:.2f}x) "
            f"| {r['peak_anon_rss_bytes'] / gb:.2f} GB | {r['expert_fallbacks']} |"
        )
    peak = max(calibration_peak(r) for r in sweep)
    load = max(r["phase_peak_rss_bytes"]["load"] for r in sweep)
    full = first["layer_bf16_bytes"] * 48
    return "\n".join(
        [
            f"`{MOE_SWEEP_CMD}` (record `benchmarks/results/scale.json`, commit {first['commit'][:7]}, "
            f"{first['cpu']}, {first['threads']} threads): Qwen3-VL-30B-A3B text shapes, random bf16 weights on "
            f"disk, every layer offloaded, TLQ W4A16-g128 with its gradient pass, {first['samples']} real-photo rows "
            f"({first['tokens']} tokens; tokens per expert min {min(tokens)} / median "
            f"{sorted(tokens)[len(tokens) // 2]} / max {max(tokens)}). Per-layer figures are means over layers; "
            'statistics include the full-precision targets, "in experts" is time inside the experts modules.',
            "",
            *rows,
            "",
            f"Peak RSS while calibrating at most {peak / gb:.2f} GB = {peak / full:.3f}x the 48-layer model's "
            f"{full / gb:.0f} GB of bf16 decoder (target <= 9 GB, 0.15x). Peak RSS (VmHWM, each phase's "
            "high-water mark read and reset at the phase change) counts file pages: while transformers loads the "
            "checkpoint it rewrites the fused experts (a transpose) into the offload folder through the memory-"
            f"mapped shards, whose pages the kernel keeps resident until it needs them (up to {load / gb:.2f} GB "
            f"here; reclaimable page cache, not allocations). {sweep_growth('qwen3vlmoe-30b-width', runs)}",
            *_limited_line(runs),
            *(
                [
                    "",
                    "\\* other processes used more than 5 % of the CPU time during this row (`contended` in its "
                    "record).",
                ]
                if any(r.get("contended") for r in sweep)
                else []
            ),
        ]
    )


def _limited_line(runs: list[dict]) -> list[str]:
    """The sentence on the ``moe-limited`` row, if it ran: the deepest sweep row under a memory-group limit."""
    row = next((r for r in runs if r["name"] == "moe-limited-L8"), None)
    if row is None:
        return []
    gb = 1e9
    return [
        "",
        f"The same {row['layers']}-layer run in a {row['memory_limit_bytes'] / gb:.0f} GB cgroup memory limit "
        f"(`{row['command']}`, commit {row['commit'][:7]}) runs to the end with the same per-phase peaks: the "
        f"group's peak (page cache included) {row['cgroup_peak_bytes'] / gb:.2f} GB, the process's peak RSS "
        f"{row['peak_rss_bytes'] / gb:.2f} GB (load {row['phase_peak_rss_bytes']['load'] / gb:.2f}, calibration "
        f"{calibration_peak(row) / gb:.2f}), peak anon {row['peak_anon_rss_bytes'] / gb:.2f} GB: the load's extra "
        "RSS is page cache the kernel takes back when it must. (Its wall time is not a figure: the row shared the "
        "cores with a test run, and writing the offload folder under a tight limit is throttled.)",
    ]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        worker = _worker_llmc if job.get("library") == "llm-compressor" else _worker
        print(json.dumps(worker(job)), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", default=["llava-1b-disk", "sweep"], choices=sorted(ROWS))
    args = p.parse_args()
    for row in args.rows:
        records = ROWS[row]()
        for r in records:
            print(json.dumps({k: v for k, v in r.items() if k != "layer_seconds"}), flush=True)
        write(records)


if __name__ == "__main__":
    main()
