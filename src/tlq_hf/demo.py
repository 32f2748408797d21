"""``python -m tlq_hf demo``: what quantization keeps of a trained VLM's answers, offline, in under a minute.

The model is the small LLaVA-architecture VLM trained for the quality benchmark and committed with the
repository (``benchmarks/models/llava-vqa``: SigLIP-style tower, 4-layer Llama-style decoder, 88.6 %
held-out accuracy on a synthetic visual question answering task whose answers need the image). The demo
quantizes it on load with round-to-nearest, GPTQ and TLQ at W4 and W3 (group 128), calibrated on 64
training items; scores every model on held-out items (accuracy, first-answer-token KL against full
precision); saves the TLQ W4 model as compressed-tensors, reloads it and checks it computes the same
answers; and writes a PNG chart of the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .arch import load_auto_class
from .config import TLQConfig
from .evaluation import FirstAnswerEval, linear_bytes_on_disk

__all__ = ["demo_main", "run_demo", "BENCHMARKS"]

logger = logging.getLogger(__name__)

#: The repository's benchmark folder (trained models and the task generator); present in a clone.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
COMPARED = ("rtn", "gptq", "tlq")  # the methods the demo puts side by side
SCHEMES = {"W4A16-g128": dict(bits=4, group_size=128), "W3A16-g128": dict(bits=3, group_size=128)}


def _task(benchmarks: Path) -> Any:
    if not (benchmarks / "vqa_task.py").exists():
        raise SystemExit(
            f"the demo runs on the trained benchmark VLM committed with the repository, but {benchmarks} is missing: "
            "run it from a clone (pip install -e . inside it), or pass --benchmarks PATH/TO/benchmarks"
        )
    # loaded from its file as a module of its own: no change to sys.path
    spec = importlib.util.spec_from_file_location("tlq_hf_demo_vqa_task", benchmarks / "vqa_task.py")
    task = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = task  # dataclasses resolve their module by name while the file runs
    spec.loader.exec_module(task)
    return task


def _chart(table: dict[str, dict[str, dict[str, float]]], fp_accuracy: float, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("tlq_hf demo: no chart (pip install matplotlib to get %s)", path.name)
        return None
    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(COMPARED)
    for k, method in enumerate(COMPARED):
        xs = [i + (k - 1) * width for i in range(len(table))]
        acc_ax.bar(xs, [table[s][method]["accuracy"] * 100 for s in table], width, label=method.upper())
        kl_ax.bar(xs, [table[s][method]["kl"] for s in table], width, label=method.upper())
    acc_ax.axhline(fp_accuracy * 100, color="black", linestyle="--", linewidth=1, label="full precision")
    for ax, title in ((acc_ax, "held-out accuracy (%)"), (kl_ax, "answer KL vs full precision (log)")):
        ax.set_xticks(range(len(table)), list(table))
        ax.set_title(title, fontsize=10)
    acc_ax.set_ylim(max(0.0, min(min(v["accuracy"] for v in t.values()) for t in table.values()) * 100 - 10), 100)
    kl_ax.set_yscale("log")
    acc_ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _print_table(
    model_name: str, millions: float, num_samples: int, held_out: int, fp_accuracy: float, table: dict
) -> None:
    print(
        f"tlq_hf demo: {model_name} (trained LLaVA-architecture VLM, {millions:.1f}M parameters), calibrated on "
        f"{num_samples} training items, scored on {held_out} held-out items"
    )
    print(f"  full precision: accuracy {fp_accuracy:.1%}")
    print(f"  {'scheme':<11} {'method':<5} {'accuracy':>8} {'kept':>6} {'answer KL':>10} {'flips':>6} {'time':>6}")
    for scheme, methods in table.items():
        for method, m in methods.items():
            print(
                f"  {scheme:<11} {method:<5} {m['accuracy']:>8.1%} {m['accuracy'] / fp_accuracy:>6.1%} "
                f"{m['kl']:>10.2e} {1 - m['agreement']:>6.1%} {m['seconds']:>5.1f}s"
            )


def run_demo(
    out: Path,
    benchmarks: Path = BENCHMARKS,
    model_name: str = "llava-vqa",
    num_samples: int = 64,
    held_out: int = 600,
) -> dict[str, Any]:
    """Run the demo, print the table, and return its numbers."""
    from transformers import AutoProcessor

    start = time.perf_counter()
    task = _task(benchmarks)
    model_dir = benchmarks / "models" / model_name
    auto = load_auto_class()
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = task.make_items(num_samples, seed=0, split="train")
    evaluator = FirstAnswerEval(processor, task.make_items(held_out, seed=5678, split="test"))
    fp = auto.from_pretrained(model_dir, dtype=torch.float32)
    ref = evaluator.logprobs(fp)
    fp_accuracy = float((ref.argmax(-1) == evaluator.answers).float().mean())

    table: dict[str, dict[str, dict[str, float]]] = {}
    keep = None
    for scheme, fields in SCHEMES.items():
        table[scheme] = {}
        for method in COMPARED:
            t0 = time.perf_counter()
            config = TLQConfig(method=method, dataset=rows, num_samples=num_samples, **fields)
            model = auto.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config)
            seconds = time.perf_counter() - t0
            table[scheme][method] = evaluator.metrics(ref, evaluator.logprobs(model)) | {"seconds": seconds}
            if (scheme, method) == ("W4A16-g128", "tlq"):
                keep = model

    q_dir = out / f"{model_name}-tlq-w4"
    shutil.rmtree(q_dir, ignore_errors=True)
    keep.save_pretrained(q_dir)
    processor.save_pretrained(q_dir)
    reloaded = auto.from_pretrained(q_dir, dtype=torch.float32)
    again = evaluator.logprobs(reloaded)
    in_memory = evaluator.logprobs(keep)
    reload_diff = float((again - in_memory).abs().max())
    decoder = r"^(?!.*(vision|visual)).*layers\.\d+\.(self_attn|mlp)\."
    q_bytes, fp_bytes = linear_bytes_on_disk(q_dir, decoder), linear_bytes_on_disk(model_dir, decoder)
    chart = _chart(table, fp_accuracy, out / "tlq-demo.png")

    millions = sum(p.numel() for p in fp.parameters()) / 1e6
    _print_table(model_name, millions, num_samples, held_out, fp_accuracy, table)
    print(
        f"  decoder linears on disk: {q_bytes['stored'] / 1e6:.2f} MB (W4, compressed-tensors) vs "
        f"{fp_bytes['stored'] / 1e6:.2f} MB full precision ({q_bytes['stored'] / fp_bytes['stored']:.3f}x)"
    )
    print(f"  saved {q_dir} (with README.md model card); reloaded without calibration: max |diff| {reload_diff:.1e}")
    if chart is not None:
        print(f"  chart: {chart}")
    print(f"  total {time.perf_counter() - start:.1f}s")
    if reload_diff > 1e-4:
        raise RuntimeError(f"the reloaded model differs from the in-memory quantized model ({reload_diff:.2e})")
    return {
        "fp_accuracy": fp_accuracy,
        "table": table,
        "bytes_ratio": q_bytes["stored"] / fp_bytes["stored"],
        "reload_max_diff": reload_diff,
        "chart": chart,
    }


def demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlq_hf demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tlq-demo-out", help="working folder (default ./tlq-demo-out)")
    p.add_argument("--benchmarks", default=str(BENCHMARKS), help="the repository's benchmarks folder")
    p.add_argument("--model", default="llava-vqa", help="a trained model under benchmarks/models")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--held-out", type=int, default=600)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_demo(out, Path(args.benchmarks), args.model, args.num_samples, args.held_out)
    return 0
