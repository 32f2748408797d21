"""The demo and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _helpers import auto_class, write_dataset_folder
from transformers import AutoProcessor

from tlq_hf.cli import quantize_main
from tlq_hf.demo import run_demo
from tlq_hf.nn import TLQLinear


def test_demo_runs_and_reports(tmp_path, capsys):
    numbers = run_demo(tmp_path, num_samples=32, held_out=200)
    text = capsys.readouterr().out
    assert "full precision: accuracy" in text and "reloaded without calibration" in text
    table = numbers["table"]
    assert numbers["fp_accuracy"] > 0.8 and numbers["reload_max_diff"] <= 1e-4 and numbers["bytes_ratio"] < 0.2
    assert table["W4A16-g128"]["tlq"]["accuracy"] >= 0.95 * numbers["fp_accuracy"]  # answers kept
    assert table["W4A16-g128"]["tlq"]["kl"] < table["W4A16-g128"]["rtn"]["kl"]
    assert table["W3A16-g128"]["gptq"]["kl"] < table["W3A16-g128"]["rtn"]["kl"]
    assert numbers["chart"] is not None and numbers["chart"].stat().st_size > 1000


def test_tlq_quantize_command(tiny_vlm_dirs, tmp_path):
    rc = quantize_main(
        [tiny_vlm_dirs["qwen2_5_vl"], "--out", str(tmp_path / "q"), "--bits", "3", "--format", "tlq", "--method", "rtn"]
    )
    assert rc == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert AutoProcessor.from_pretrained(tmp_path / "q").chat_template  # processor saved with the weights
    model = auto_class().from_pretrained(tmp_path / "q")
    assert any(isinstance(m, TLQLinear) for m in model.modules())


def test_module_entry_point_usage_error():
    proc = subprocess.run([sys.executable, "-m", "tlq_hf"], capture_output=True, text=True)
    assert proc.returncode == 2 and "demo" in proc.stderr


def test_tlq_quantize_command_calibrates_on_a_dataset_folder(tiny_vlm_dirs, tmp_path):
    pytest.importorskip("datasets")
    folder = write_dataset_folder(tmp_path / "calib", 4)
    out = tmp_path / "q"
    assert (
        quantize_main([tiny_vlm_dirs["llava"], "--out", str(out), "--dataset", str(folder), "--num-samples", "4"]) == 0
    )
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors"


def test_cli_everything_on_disk_with_checkpoints_equals_in_memory(tiny_vlm_dirs, tmp_path):
    """--max-memory cpu=2MB sends the whole model to disk; the checkpoint is the in-memory one, bit for bit."""
    pytest.importorskip("datasets")
    from safetensors.torch import load_file

    folder = write_dataset_folder(tmp_path / "calib", 4)
    common = ["--dataset", str(folder), "--num-samples", "4", "--bits", "4"]
    path = tiny_vlm_dirs["qwen2_vl"]
    assert quantize_main([path, "--out", str(tmp_path / "ref"), *common]) == 0
    offloaded = [
        path,
        "--out",
        str(tmp_path / "disk"),
        "--max-memory",
        "cpu=2MB",
        "--offload-dir",
        str(tmp_path / "offload"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    assert quantize_main(offloaded + common) == 0
    assert '"layers_done": 2' in (tmp_path / "ckpt" / "manifest.json").read_text()
    ref, disk = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "disk" / "model.safetensors")
    assert set(ref) == set(disk) and all(torch.equal(ref[k], disk[k]) for k in ref)


def test_max_memory_and_device_map_arguments():
    from tlq_hf.cli import _device_map, parse_max_memory

    assert parse_max_memory("cpu=4GiB, 0=20GiB") == {"cpu": "4GiB", 0: "20GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(SystemExit, match="DEVICE=SIZE"):
        parse_max_memory("4GiB")
    assert _device_map('{"model.layers.0": "disk"}') == {"model.layers.0": "disk"}
    assert _device_map("auto") == "auto"


def test_runtime_paths_never_import_the_test_fixtures(tiny_vlm_dirs, tmp_path):
    """Quantize from a dataset folder with the CLI, then reload the checkpoint: neither the fixture module
    (tiny models, scikit-image photos) nor scikit-image is imported (they are not runtime dependencies)."""
    pytest.importorskip("datasets")
    folder = write_dataset_folder(tmp_path / "data", 4)
    out = tmp_path / "q"
    script = f"""
import sys
from tlq_hf.cli import quantize_main
from tlq_hf.arch import load_auto_class
assert quantize_main([{tiny_vlm_dirs["llava"]!r}, "--out", {str(out)!r}, "--dataset", {str(folder)!r},
                      "--num-samples", "4", "--method", "gptq"]) == 0
load_auto_class().from_pretrained({str(out)!r})
leaked = sorted(m for m in sys.modules if m == "tlq_hf.testing.tiny_models" or m.split(".")[0] == "skimage")
assert not leaked, leaked
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _parse(argv):
    import argparse

    from tlq_hf.cli import _add_quant_args, _config

    p = argparse.ArgumentParser()
    _add_quant_args(p)
    return _config(p.parse_args(argv))


def test_every_config_field_is_an_option_and_defaults_are_the_configs():
    """The options are generated from TLQConfig's signature: a new field appears without touching the CLI."""
    import inspect

    from tlq_hf import TLQConfig
    from tlq_hf.cli import config_fields

    fields = [n for n in inspect.signature(TLQConfig.__init__).parameters if n not in ("self", "kwargs")]
    assert set(config_fields()) == set(fields) - {"processor"}
    assert _parse([]).to_dict() == TLQConfig().to_dict()
    cfg = _parse(
        "--bits 3 --group-size 64 --method gptaq --no-act-order --importance-clip 0.1 10 --exposed false "
        "--solver none --act-bits 8 --ignore re:.*visual.* lm_head --importance-labels predictive "
        "--answer-tokens first --importance-topk 2 --damp 0.05 --max-length none --format tlq --asym".split()
    )
    assert (cfg.bits, cfg.group_size, cfg.method, cfg.act_order, cfg.importance_clip) == (
        3,
        64,
        "gptaq",
        False,
        [0.1, 10],
    )
    assert (cfg.exposed, cfg.solver, cfg.act_bits, cfg.ignore) == (False, None, 8, ["re:.*visual.*", "lm_head"])
    assert (cfg.importance_labels, cfg.answer_tokens, cfg.importance_topk, cfg.damp) == ("predictive", "first", 2, 0.05)
    assert (cfg.max_length, cfg.save_format, cfg.sym) == (None, "tlq", False)


def test_scheme_presets_on_the_command_line():
    cfg = _parse("--scheme NVFP4A16 --method gptq".split())
    assert (cfg.bits, cfg.group_size, cfg.grid, cfg.act_bits, cfg.scheme.name) == (4, 16, "nvfp4", None, "NVFP4A16")
    cfg = _parse("--scheme FP8_DYNAMIC".split())
    assert (cfg.grid, cfg.act_grid, cfg.act_bits, cfg.group_size) == ("fp8", "fp8", 8, -1)
    assert "scheme" not in cfg.to_dict()  # the fields are serialised, the shorthand is not
    with pytest.raises(ValueError, match="the preset sets bits=4"):
        _parse("--scheme NVFP4A16 --bits 8".split())


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--scheme FP8_BLOCK", "invalid choice: 'FP8_BLOCK'"),
        ("--grid nvfp4", "does not fit group_size=128 (use 16)"),
        ("--bits 5", "invalid choice: 5"),
        ("--method sgd", "invalid choice: 'sgd'"),
        ("--group-size many", "invalid int value: 'many'"),
        ("--importance-clip 0.1", "expected 2 arguments"),
        ("--gamma -1", "gamma=-1.0"),  # parsed, then refused by TLQConfig with the fix
    ],
)
def test_bad_arguments_are_refused_clearly(argv, message, capsys):
    with pytest.raises((SystemExit, ValueError)) as err:
        _parse(argv.split())
    text = capsys.readouterr().err + (str(err.value) if isinstance(err.value, ValueError) else "")
    assert message in text


def test_report_and_log_level(tiny_vlm_dirs, tmp_path):
    report = tmp_path / "report.json"
    argv = [tiny_vlm_dirs["llava"], "--out", str(tmp_path / "q"), "--method", "rtn", "--log-level", "warning"]
    assert quantize_main([*argv, "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["method"] == "rtn" and len(data["modules"]) == 14 and data["format"] == "compressed-tensors"
    assert all(0 < m["rel_weight_error"] < 1 for m in data["modules"]) and "summary" in data
