"""Inference benchmark: loaded-model memory and decode tokens/s of W4 checkpoints vs the bf16 model.

Not a test. One run, one machine, every variant in its own fresh process (sequentially), so the ratios
compare like with like:

- ``fp32`` and ``bf16``: the random-weight bf16 checkpoint (``benchmarks/scale.py`` writes it, tensor by tensor)
  loaded in float32 and in bf16 (dense baselines);
- ``native``: tlq_hf's native W4A16-g128 checkpoint (RTN; the solver does not change speed), reloaded with
  tlq_hf: the packed layers run the kernel ``tlq_hf.nn.kernels`` picks (int4pack on CPU for bf16);
- ``compressed-tensors``: the default-format checkpoint of the same model, reloaded by transformers
  (which decompresses it to dense weights on CPU);
- ``native-w8a8``: tlq_hf's native W8A8 (per-channel int8 weights, dynamic per-token int8 activations),
  whose layers run ``torch._int_mm`` on CPU.

Memory is the growth of the process's resident set (VmRSS, anonymous + file-backed: a bf16 checkpoint is
memory-mapped, so its pages count once read) from before ``from_pretrained`` to after decoding, with Python's
and malloc's free memory released first; decode speed is ``(n - 1) / (t(n new tokens) - t(1 new token))``
for greedy generation from a text prompt, best of 3 within a process; every variant runs in ``--runs`` fresh
processes (default 3), reported as the median run with every run's speed beside it. Writes
``benchmarks/results/inference.json`` and ``INFERENCE.md``.

Usage::

    python benchmarks/inference.py                          # llava-1b: Llama-3.2-1B text shapes, vocab 128256
    python benchmarks/inference.py --model llava-1b-v32k    # the same with a 32000 vocabulary
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale  # noqa: E402  (the random-weight checkpoint writer)
from provenance import Measurement  # noqa: E402

scale.MODELS["llava-1b-v32k"] = dict(family="llava", text=scale.LLAMA_1B, vocab=32000, image=224)
RESULTS = HERE / "results"


def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _settled_rss_kb() -> dict[str, int]:
    """Resident set after freeing what Python and malloc hold on to (so transient load buffers do not count)."""
    import gc

    from tlq_hf.hostmem import release_host_memory

    gc.collect()
    release_host_memory()
    return {k: _rss_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}


def measure(folder: str, threads: int, new_tokens: int, prompt_tokens: int, dtype: str = "bfloat16") -> dict:
    """In this process: load ``folder`` in ``dtype``, then time greedy decoding. Returns the record."""
    import torch

    import tlq_hf  # noqa: F401  (registers the quantizer for the native format)
    from tlq_hf.arch import load_auto_class
    from tlq_hf.nn import TLQLinear

    torch.set_num_threads(threads)
    before = _settled_rss_kb()
    model = load_auto_class().from_pretrained(folder, dtype=getattr(torch, dtype))
    loaded_mb = (_settled_rss_kb()["VmRSS"] - before["VmRSS"]) / 1024
    kernels = sorted({m.kernel_name for m in model.modules() if isinstance(m, TLQLinear)})
    dense = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)
    )  # a compressed-tensors reload may keep its linears compressed (no dense ``weight``)
    ids = torch.randint(100, 30000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == prompt_tokens + n
        return time.perf_counter() - t

    run(2)  # warm-up
    decode = min((run(new_tokens) - run(1)) / (new_tokens - 1) for _ in range(3))
    after = _settled_rss_kb()  # every weight page has been read by now (an mmap-ed checkpoint is resident too)
    grown = {k: (after[k] - before[k]) / 1024 for k in after}
    return dict(
        resident_mb=grown["VmRSS"],
        anon_mb=grown["RssAnon"],
        file_mb=grown["RssFile"],
        loaded_mb=loaded_mb,
        decode_tok_s=1.0 / decode,
        kernels=kernels,
        dense_linear_params=dense,
    )


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(measure(args.child, args.threads, args.new_tokens, args.prompt_tokens, args.dtype)))


#: variant -> (folder suffix, TLQConfig arguments); RTN: the solver does not change speed or memory.
QUANTIZED = {
    "native": ("w4g128-tlq", dict(bits=4, group_size=128, save_format="tlq")),
    "compressed-tensors": ("w4g128-compressed-tensors", dict(bits=4, group_size=128)),
    "native-w8a8": ("w8a8-tlq", dict(bits=8, group_size=-1, act_bits=8, save_format="tlq")),
}


def _quantize(src: Path, out: Path, kwargs: dict) -> None:
    code = (
        "import torch, tlq_hf\nfrom tlq_hf import TLQConfig\nfrom tlq_hf.arch import load_auto_class\n"
        f"cfg = TLQConfig(method='rtn', **{kwargs!r})\n"
        f"load_auto_class().from_pretrained({str(src)!r}, quantization_config=cfg, dtype=torch.bfloat16)"
        f".save_pretrained({str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _in_child(folder: Path, args: argparse.Namespace, dtype: str = "bfloat16") -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--threads", str(args.threads), "--dtype", dtype]
    cmd += ["--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _runs(folder: Path, args: argparse.Namespace, dtype: str) -> dict:
    """``args.runs`` fresh processes of one variant: the median run's figures, and every run's decode speed and
    resident memory (the spread)."""
    runs = [_in_child(folder, args, dtype) for _ in range(args.runs)]
    median = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
    return median | {
        "runs_decode_tok_s": [round(r["decode_tok_s"], 3) for r in runs],
        "runs_resident_mb": [round(r["resident_mb"], 1) for r in runs],
    }


README_BEGIN, README_END = "<!-- inference -->", "<!-- /inference -->"
LABELS = {
    "fp32": ("fp32", "dense"),
    "bf16": ("bf16", "dense"),
    "native": ('native W4A16-g128 (`save_format="tlq"`)', None),
    "compressed-tensors": ("compressed-tensors W4A16-g128 (default)", "dense (transformers decompresses)"),
    "native-w8a8": ("native W8A8 (per-channel)", None),
}


def readme_block(result: dict) -> str:
    """The README's inference table, from the ``inference.json`` record."""
    flags = ", ".join(result.get("cpu_flags") or [])
    lines = [
        f"`{result['command'].strip()}` (record `benchmarks/results/inference.json`, commit {result['commit'][:7]}, "
        f"{result['cpu']}{' with ' + flags if flags else ''}, {result['threads']} threads"
        f"{', contended' if result.get('contended') else ''}): model `{result['model']}`, greedy decode of "
        f"{result['new_tokens']} tokens after a {result['prompt_tokens']}-token prompt; each variant in "
        f"{len(next(iter(result['variants'].values()))['runs_decode_tok_s'])} fresh processes, the median run shown "
        "with every run's speed.",
        "",
        "| variant | kernel | resident MB | memory vs bf16 | decode tok/s (runs) | decode vs bf16 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in result["variants"].items():
        label, kernel = LABELS.get(name, (name, None))
        runs = " / ".join(f"{v:.2f}" for v in r["runs_decode_tok_s"])
        lines.append(
            f"| {label} | {kernel or ', '.join(r['kernels']) or 'dense'} | {r['resident_mb']:.0f} "
            f"| {r['memory_vs_bf16']:.2f}x | {r['decode_tok_s']:.2f} ({runs}) | {r['decode_vs_bf16']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-1b", choices=sorted(scale.MODELS))
    p.add_argument("--runs", type=int, default=3, help="fresh processes per variant (median and spread reported)")
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)  # a child's load dtype
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    measured = Measurement("python benchmarks/inference.py " + " ".join(sys.argv[1:]))
    if args.child:
        return _child(args)

    src = scale.build_model(args.model)
    variants = {"fp32": src, "bf16": src}  # the same bf16 checkpoint, loaded in float32 and in bf16
    for name, (suffix, kwargs) in QUANTIZED.items():
        out = src.parent / f"{src.name}-{suffix}"
        if not (out / "DONE").exists():  # a save killed half-way is redone, never measured
            _quantize(src, out, kwargs)
            (out / "DONE").touch()
        variants[name] = out
    records = {
        name: _runs(folder, args, "float32" if name == "fp32" else "bfloat16") for name, folder in variants.items()
    }
    base = records["bf16"]
    for r in records.values():
        r["memory_vs_bf16"] = r["resident_mb"] / base["resident_mb"]
        r["decode_vs_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]
    result = measured.record() | dict(
        model=args.model,
        threads=args.threads,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        variants=records,
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(result, indent=1) + "\n")
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    if README_BEGIN in text:
        head, rest = text.split(README_BEGIN, 1)
        readme.write_text(f"{head}{README_BEGIN}\n{readme_block(result)}\n{README_END}{rest.split(README_END, 1)[1]}")
    lines = [
        f"# Inference: {args.model}, {args.threads} threads, decode {args.new_tokens} tokens, median of {args.runs} "
        "fresh processes per variant (spread: every run's decode tok/s)",
        "",
        f"`{result['command']}`",
        "",
        "| variant | kernels | resident MB (anon + file) | memory vs bf16 | decode tok/s (runs) | decode vs bf16 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in records.items():
        lines.append(
            f"| {name} | {', '.join(r['kernels']) or 'dense'} | {r['resident_mb']:.0f} ({r['anon_mb']:.0f} + "
            f"{r['file_mb']:.0f}) | {r['memory_vs_bf16']:.2f}x "
            f"| {r['decode_tok_s']:.2f} ({' / '.join(f'{v:.2f}' for v in r['runs_decode_tok_s'])}) "
            f"| {r['decode_vs_bf16']:.2f}x |"
        )
    (RESULTS / "INFERENCE.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
