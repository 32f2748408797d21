"""Crash safety: a killed save leaves the previous checkpoint intact; an interrupted calibration puts the model
back as it was; the same input gives the same bytes. (Resume after SIGKILL, also mid-write: test_scale.py.)"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import auto_class, logits_of

from tlq_hf import TLQConfig, quantize
from tlq_hf.calibration import journal
from tlq_hf.formats import atomic
from tlq_hf.nn import TLQLinear
from tlq_hf.testing.tiny_models import sample_rows

FAMILY = "llava"


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def saved(tiny_vlm_dirs, tmp_path):
    model = auto_class().from_pretrained(tiny_vlm_dirs[FAMILY], quantization_config=TLQConfig(method="rtn"))
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    return model, out


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(saved, monkeypatch):
    model, out = saved
    before = _digests(out)
    with torch.no_grad():  # change the weights, so that a leaked partial save would show
        for m in model.modules():
            if isinstance(m, TLQLinear):
                m.weight_scale.mul_(2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tlq_hf.formats.card.write_model_card", interrupted)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    assert _digests(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_a_save_replaces_the_model_files_and_keeps_the_processor(saved, tiny_vlm_dirs):
    from transformers import AutoProcessor

    model, out = saved
    AutoProcessor.from_pretrained(tiny_vlm_dirs[FAMILY]).save_pretrained(out)
    (out / "model.safetensors.index.json").write_text("{}")  # a stale file of the model's own kind
    before = set(_digests(out))
    assert {"tokenizer.json", "processor_config.json"} <= before
    model.save_pretrained(out)
    after = set(_digests(out))
    assert "model.safetensors.index.json" not in after  # stale weight files do not survive
    assert before - {"model.safetensors.index.json"} <= after  # the processor's files do
    auto_class().from_pretrained(out)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from tlq_hf import TLQConfig
    from tlq_hf.formats import card
    from tlq_hf.testing.tiny_models import load_auto_class

    model = load_auto_class().from_pretrained(sys.argv[1], quantization_config=TLQConfig(method="rtn", bits=3))
    card.write_model_card = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    model.save_pretrained(sys.argv[2])
    """
)


def test_a_killed_save_process_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(
    saved, tiny_vlm_dirs, tmp_path
):
    model, out = saved
    before = _digests(out)
    script = tmp_path / "kill.py"
    script.write_text(_KILLED_SAVE)
    proc = subprocess.run([sys.executable, str(script), tiny_vlm_dirs[FAMILY], str(out)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert _digests(out) == before
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert leftovers  # the dead process's temporary folder...
    model.save_pretrained(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ckpt.")]  # ...is removed by the next save


def test_a_previous_checkpoint_set_aside_by_a_killed_save_is_restored(tmp_path):
    target = tmp_path / "ckpt"
    parked = tmp_path / ".ckpt.old-999999999"  # no such process
    parked.mkdir()
    (parked / "config.json").write_text("{}")
    with atomic.atomic_folder(tmp_path / "other"):
        pass
    with atomic.atomic_folder(target) as folder:
        assert (target / "config.json").exists()  # restored before the new save starts
        (folder / "config.json").write_text('{"new": 1}')
    assert (target / "config.json").read_text() == '{"new": 1}'


def test_without_an_atomic_exchange_the_two_renames_also_replace(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    for text in ("old", "new"):
        with atomic.atomic_folder(target) as folder:
            (folder / "a.txt").write_text(text)
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _interrupt_ninth_swap(monkeypatch) -> list[str]:
    """Make the ninth module swap (in the middle of the second decoder layer) raise KeyboardInterrupt; the
    names of the swaps tried are appended to the returned list."""
    swap, calls = journal.ModelEdits.swap, []

    def swap_then_interrupt(self, name, new):
        calls.append(name)
        if len(calls) == 9:
            raise KeyboardInterrupt
        swap(self, name, new)

    monkeypatch.setattr(journal.ModelEdits, "swap", swap_then_interrupt)
    return calls


@pytest.mark.parametrize("method", ["tlq", "awq"])  # awq: smoothing writes into norms and linears in place
def test_interrupted_calibration_puts_the_model_back(tiny_vlm_dirs, batch_for, monkeypatch, method):
    model = auto_class().from_pretrained(tiny_vlm_dirs[FAMILY], dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    batch = batch_for(FAMILY)
    reference = logits_of(model, batch)
    swap, calls = journal.ModelEdits.swap, _interrupt_ninth_swap(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        quantize(model, TLQConfig(method=method, dataset=sample_rows(4), num_samples=4))
    assert len(calls) == 9
    assert not any(isinstance(m, TLQLinear) for m in model.modules())
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())  # the very same module objects
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert torch.equal(logits_of(model, batch), reference)
    monkeypatch.setattr(journal.ModelEdits, "swap", swap)
    quantize(model, TLQConfig(method="rtn"))  # a plain model again: it can be quantized now


def _load(path, placement: str, tmp_path):
    if placement == "disk":  # every decoder layer streamed from the offload folder by accelerate hooks
        from tlq_hf.arch import decoder_device_map

        config = auto_class().from_pretrained(path).config
        with torch.device("meta"):
            device_map = decoder_device_map(auto_class().from_config(config))
        kw = dict(dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "weights"))
    else:  # bf16 on CPU: layers compute on float32 copies that are cast back when a layer is settled
        kw = dict(dtype=torch.bfloat16)
    return auto_class().from_pretrained(path, **kw)


@pytest.mark.parametrize("placement", ["disk", "bf16"])
@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_interrupted_calibration_puts_offloaded_and_upcast_models_back(
    tiny_vlm_dirs, batch_for, monkeypatch, tmp_path, method, placement
):
    """Layers settled after onloading (re-homed to disk, or cast back from float32 copies) and re-pointed
    accelerate hooks are put back too: the model computes exactly what it did."""
    model = _load(tiny_vlm_dirs[FAMILY], placement, tmp_path)
    batch = batch_for(FAMILY)
    if placement == "bf16":
        batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    reference = logits_of(model, batch)
    swap, calls = journal.ModelEdits.swap, _interrupt_ninth_swap(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        quantize(model, TLQConfig(method=method, dataset=sample_rows(4), num_samples=4))
    assert len(calls) == 9 and not any(isinstance(m, TLQLinear) for m in model.modules())
    assert torch.equal(logits_of(model, batch), reference)
    monkeypatch.setattr(journal.ModelEdits, "swap", swap)
    quantize(model, TLQConfig(method="rtn"))  # and it can be quantized again


def test_same_input_gives_the_same_checkpoint_bytes(tiny_vlm_dirs, tmp_path):
    """Two runs of the same model, data, config and seed write byte-identical folders (weights, configs, card)."""
    digests = []
    for run in ("a", "b"):
        cfg = TLQConfig(dataset=sample_rows(4), num_samples=4, seed=3)
        model = auto_class().from_pretrained(tiny_vlm_dirs[FAMILY], dtype=torch.float32, quantization_config=cfg)
        model.save_pretrained(tmp_path / run)
        digests.append(_digests(tmp_path / run))
    assert digests[0] == digests[1]
    assert {"model.safetensors", "config.json", "README.md"} <= digests[0].keys()


def test_safetensors_headers_are_canonical(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tlq_hf.formats.canonical import canonicalize_safetensors

    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.int32)}
    for name, meta in (
        ("x", {"format": "pt", "zeta": "1", "alpha": "2"}),
        ("y", {"alpha": "2", "zeta": "1", "format": "pt"}),
    ):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata=meta)
        canonicalize_safetensors(tmp_path / name)
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            assert list(f.metadata()) == sorted(meta) or f.metadata() == meta
        loaded = load_file(tmp_path / name / "model.safetensors")
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert (tmp_path / "x" / "model.safetensors").read_bytes() == (tmp_path / "y" / "model.safetensors").read_bytes()
