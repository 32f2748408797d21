"""Command line: ``tlq-quantize MODEL --out DIR`` and ``python -m tlq_hf {demo,quantize}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import METHODS, SOLVERS

__all__ = ["main", "parse_max_memory", "quantize_main"]


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 for per-channel")
    p.add_argument("--act-bits", type=int, default=None, choices=[8], help="8: dynamic per-token int8 activations")
    p.add_argument("--asym", action="store_true", help="asymmetric weights (needs --format tlq)")
    p.add_argument("--method", default="tlq", choices=list(METHODS))
    p.add_argument("--solver", default=None, choices=list(SOLVERS), help="for --method tlq (default gptq)")
    p.add_argument("--dataset", default=None, help="calibration data: local dataset folder or Hub dataset id")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--format", dest="save_format", default="compressed-tensors", choices=["compressed-tensors", "tlq"])
    p.add_argument("--ignore", nargs="*", default=None, help="regexes of modules to keep in full precision")
    p.add_argument(
        "--offload-dir",
        default=None,
        help="folder for calibration activations (one file per sample: host memory holds one layer's worth) and, "
        "with a device map that sends weights to disk, for those weights",
    )
    p.add_argument(
        "--checkpoint-dir", default=None, help="per-layer checkpoints: a restarted run skips the finished layers"
    )


def _config(args: argparse.Namespace):
    from .config import TLQConfig

    return TLQConfig(
        bits=args.bits,
        group_size=args.group_size,
        act_bits=args.act_bits,
        sym=not args.asym,
        method=args.method,
        solver=args.solver,
        dataset=args.dataset,
        num_samples=args.num_samples,
        max_length=args.max_length,
        save_format=args.save_format,
        ignore=args.ignore,
        offload_dir=args.offload_dir,
        checkpoint_dir=args.checkpoint_dir,
    )


def parse_max_memory(text: str | None) -> dict | None:
    """``"cpu=4GiB,0=20GiB"`` -> ``{"cpu": "4GiB", 0: "20GiB"}`` (accelerate's ``max_memory``)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SystemExit(f"--max-memory {text!r}: use DEVICE=SIZE pairs separated by commas, e.g. cpu=4GiB,0=20GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def _device_map(text: str | None):
    """``--device-map``: ``auto`` / ``balanced`` / ... or a JSON object ``{"module": "cpu" | "disk" | 0}``."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f'--device-map: not a JSON object ({err}); use auto or {{"module": "disk"}}') from err


def _quantize(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoProcessor

    from .arch import load_auto_class
    from .calibration.distributed import Comm, init_from_env

    init_from_env()  # under torchrun / accelerate launch: every rank calibrates its shard, rank 0 writes
    config = _config(args)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    start = time.perf_counter()
    load_kwargs: dict = {"quantization_config": config, "dtype": dtype, "device_map": _device_map(args.device_map)}
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is not None:
        load_kwargs["max_memory"] = max_memory
        load_kwargs["device_map"] = load_kwargs["device_map"] or "auto"
    if args.offload_dir is not None:
        load_kwargs["offload_folder"] = str(Path(args.offload_dir) / "weights")
    model = load_auto_class().from_pretrained(args.model, **load_kwargs)
    if not Comm.current().is_main:
        return 0
    out = Path(args.out)
    model.save_pretrained(out)
    try:
        AutoProcessor.from_pretrained(args.model).save_pretrained(out)
    except (OSError, ValueError) as err:
        logging.getLogger(__name__).warning("no processor saved (%s)", err)
    print(
        f"{model.tlq_report.summary()}\nsaved {config.save_format} checkpoint to {out} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


def quantize_main(argv: list[str] | None = None) -> int:
    """``tlq-quantize``: quantize a checkpoint (folder or Hub id) and save it."""
    p = argparse.ArgumentParser(prog="tlq-quantize", description="Quantize a vision-language model with TLQ.")
    p.add_argument("model", help="checkpoint folder or Hub id of the full-precision model")
    p.add_argument("--out", required=True, help="folder to write the quantized checkpoint to")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--device-map", default=None, help='"auto", "balanced", or JSON such as {"model.layers.0": "disk", ...}'
    )
    p.add_argument("--max-memory", default=None, help="per-device limits for the device map, e.g. cpu=4GiB,0=20GiB")
    _add_quant_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _quantize(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m tlq_hf {demo,quantize} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quantize":
        return quantize_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import demo_main

        return demo_main(argv[1:])
    print("usage: python -m tlq_hf {demo,quantize} [options]   (see --help of each)", file=sys.stderr)
    return 2
