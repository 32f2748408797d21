"""``python -m tlq_hf demo``: the whole path on a small VLM, offline.

Builds a small Qwen2-VL-architecture model (random weights, real architecture, local tokenizer and
processor), quantizes it on load with ``TLQConfig`` (TLQ, calibrated on question/answer pairs about real
photos from ``skimage.data``; round-to-nearest alongside for reference), compares both with the
full-precision model on held-out pairs, saves the TLQ model (compressed-tensors), reloads it and checks
the reload computes the same logits.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch

from .config import TLQConfig
from .data import build_calibration_set, sample_rows
from .evaluation import answer_metrics, compare_logits, linear_bytes_on_disk
from .tiny_models import FAMILIES, build_tiny_vlm, load_auto_class, make_inputs, sample_images

__all__ = ["demo_main", "run_demo"]

PROMPTS = ("what is in the picture", "describe the image in one word", "what color is it", "where is it")


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def run_demo(
    out: Path, family: str = "qwen2_vl", bits: int = 4, group_size: int = 128, num_samples: int = 32
) -> dict[str, float]:
    """Run the demo, print a summary, and return its numbers."""
    from transformers import AutoProcessor

    auto = load_auto_class()
    fp_dir, q_dir = out / f"{family}-fp", out / f"{family}-w{bits}g{group_size}"
    for d in (fp_dir, q_dir):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    build_tiny_vlm(family, fp_dir)
    processor = AutoProcessor.from_pretrained(fp_dir)
    batch = make_inputs(processor, sample_images(len(PROMPTS)), list(PROMPTS))
    fp = auto.from_pretrained(fp_dir, dtype=torch.float32)
    ref = _logits(fp, batch)
    t1 = time.perf_counter()

    held_out = build_calibration_set(sample_rows(12, seed=1), processor, 12, seed=7)
    rtn = auto.from_pretrained(
        fp_dir, dtype=torch.float32, quantization_config=TLQConfig(bits=bits, group_size=group_size, method="rtn")
    )
    rtn_answer = answer_metrics(fp, rtn, held_out)
    t1 = time.perf_counter()
    config = TLQConfig(bits=bits, group_size=group_size, dataset=sample_rows(num_samples), num_samples=num_samples)
    q = auto.from_pretrained(fp_dir, dtype=torch.float32, quantization_config=config)
    t2 = time.perf_counter()
    tlq_answer = answer_metrics(fp, q, held_out)
    out_q = _logits(q, batch)
    metrics = compare_logits(ref, out_q, batch["attention_mask"])
    q.save_pretrained(q_dir)
    processor.save_pretrained(q_dir)
    reloaded = auto.from_pretrained(q_dir, dtype=torch.float32)
    again = _logits(reloaded, batch)
    reload_diff = float((again - out_q).norm() / out_q.norm())

    decoder = r"^(?!.*(vision|visual)).*layers\.\d+\.(self_attn|mlp)\."
    q_bytes = linear_bytes_on_disk(q_dir, decoder)
    fp_bytes = linear_bytes_on_disk(fp_dir, decoder)
    ratio = q_bytes["stored"] / (2 * q_bytes["weights"])
    n_tokens = int(batch["attention_mask"].sum())

    print(
        f"tlq_hf demo: {family} ({sum(p.numel() for p in fp.parameters()) / 1e6:.1f}M parameters, random weights,"
        f" real architecture), {len(PROMPTS)} skimage photos, {n_tokens} tokens"
    )
    print(f"  quantized on load: {q.tlq_report.summary()}  [{t2 - t1:.1f}s]")
    print(f"  held-out answer tokens vs full precision ({len(held_out)} photo Q/A pairs):")
    print(f"    rtn {rtn.tlq_report.scheme}: {rtn_answer}")
    print(f"    tlq {q.tlq_report.scheme}: {tlq_answer}")
    print(f"  all prompt tokens, tlq vs full precision: {metrics}")
    print(
        f"  decoder linears on disk: {q_bytes['stored'] / 1e6:.2f} MB vs {fp_bytes['stored'] / 1e6:.2f} MB fp32 "
        f"({ratio:.3f}x of bf16)"
    )
    print(f"  saved compressed-tensors checkpoint: {q_dir}")
    print(f"  reloaded without calibration: logits rel. diff {reload_diff:.1e} vs in-memory model")
    print(f"  total {time.perf_counter() - t0:.1f}s")
    if reload_diff > 1e-4:
        raise RuntimeError(f"reloaded model differs from the in-memory quantized model (rel. diff {reload_diff:.2e})")
    return {
        "rel_error": metrics.rel_error,
        "kl": metrics.kl,
        "agreement": metrics.agreement,
        "answer_kl_tlq": tlq_answer.kl,
        "answer_kl_rtn": rtn_answer.kl,
        "bytes_ratio_vs_bf16": ratio,
        "reload_rel_diff": reload_diff,
    }


def demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlq_hf demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tlq-demo-out", help="working folder (default ./tlq-demo-out)")
    p.add_argument("--family", default="qwen2_vl", choices=FAMILIES)
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_demo(Path(args.out), args.family, args.bits, args.group_size)
    return 0
