"""Command line: ``tlq-quantize MODEL --out DIR`` and ``python -m tlq_hf {demo,quantize}``."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_max_memory", "quantize_main"]


#: Config fields the command line does not offer (the processor is loaded from the model).
_NOT_ON_CLI = ("processor",)
#: Older spellings kept working: extra option -> the config field it sets.
_ALIASES = {"--format": "save_format"}


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def config_fields() -> dict[str, inspect.Parameter]:
    """``TLQConfig``'s own arguments, in signature order (the single source of the command line's options)."""
    from .config import TLQConfig

    params = inspect.signature(TLQConfig.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "kwargs") and n not in _NOT_ON_CLI}


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    """One option per ``TLQConfig`` field, generated from the config's signature, docstring and ``CHOICES``:
    ``--group-size`` for ``group_size``; booleans as ``--act-order / --no-act-order``; optional values accept
    ``none``; ``--importance-clip LO HI``; ``--ignore RE [RE ...]``."""
    import typing

    from .config import CHOICES, TLQConfig, field_docs

    docs, hints = field_docs(), typing.get_type_hints(TLQConfig.__init__)
    group = p.add_argument_group("TLQConfig fields", "every field of tlq_hf.TLQConfig (see its docstring)")
    for name, param in config_fields().items():
        hint = hints.get(name, Any)
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        default = param.default
        flags = [f"--{name.replace('_', '-')}"] + [alias for alias, field in _ALIASES.items() if field == name]
        help_text = docs.get(name, "").replace("%", "%%") + f" (default: {default!r})"
        kw: dict[str, Any] = {"dest": name, "default": default, "help": help_text}
        if base is bool and not optional:
            kw["action"] = argparse.BooleanOptionalAction
        elif base is bool:  # True / False / None (the method's default)
            kw["type"] = _none_or(lambda t: {"true": True, "false": False}[t.lower()])
            kw["metavar"] = "{true,false,none}"
        elif typing.get_origin(base) in (tuple, list) and typing.get_args(base) and typing.get_args(base)[0] is float:
            kw.update(nargs=2, type=float, metavar=("LO", "HI"))
        elif typing.get_origin(base) is list:
            kw.update(nargs="+", metavar="REGEX")
        else:
            kind = base if base in (int, float) else str
            kw["type"] = _none_or(kind) if optional else kind
            if name in CHOICES:
                kw["choices"] = list(CHOICES[name])
                kw["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in CHOICES[name]) + "}"
        group.add_argument(*flags, **kw)
    # kept for older command lines: --asym = --no-sym
    group.add_argument("--asym", dest="sym", action="store_false", help="asymmetric weights (= --no-sym)")


def _config(args: argparse.Namespace):
    from .config import TLQConfig

    return TLQConfig(**{name: getattr(args, name) for name in config_fields()})


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
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(args.model)
        processor.save_pretrained(out)
    except (OSError, ValueError) as err:
        logging.getLogger(__name__).warning("no processor saved (%s)", err)
    if args.push_to_hub is not None:
        commit = model.push_to_hub(args.push_to_hub, processor=processor)
        print(f"pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    seconds = time.perf_counter() - start
    if args.report is not None:
        report = model.tlq_report.as_dict() | {"checkpoint": str(out), "format": config.save_format, "wall_s": seconds}
        Path(args.report).write_text(json.dumps(report, indent=1))
    print(f"{model.tlq_report.summary()}\nsaved {config.save_format} checkpoint to {out} in {seconds:.1f}s")
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
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="also upload the checkpoint, processor and card to REPO"
    )
    p.add_argument(
        "--report", default=None, help="write the run's summary (per layer and module errors, phases) as JSON"
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level",
    )
    _add_quant_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(message)s")
    return _quantize(args)


def verify_main(argv: list[str] | None = None) -> int:
    """``python -m tlq_hf verify DIR``: check a saved checkpoint (config scheme, tensors, scales) before sharing."""
    from .formats.native import CorruptCheckpointError
    from .formats.verify import UnsupportedSchemeError, verify_checkpoint

    p = argparse.ArgumentParser(prog="python -m tlq_hf verify", description=verify_main.__doc__)
    p.add_argument("folder", help="a checkpoint folder written by tlq_hf (compressed-tensors or native)")
    args = p.parse_args(argv)
    try:
        found = verify_checkpoint(args.folder)
    except (CorruptCheckpointError, UnsupportedSchemeError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print(f"OK: {found.quant_method} {found.scheme}, {found.modules} quantized modules in {found.files} file(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tlq_hf {demo,quantize,verify} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "quantize":
        return quantize_main(argv[1:])
    if argv and argv[0] == "verify":
        return verify_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import demo_main

        return demo_main(argv[1:])
    print("usage: python -m tlq_hf {demo,quantize,verify} [options]   (see --help of each)", file=sys.stderr)
    return 2
