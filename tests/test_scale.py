"""Scale: device-map offload, spilled activations, shared statistics, resume after SIGKILL, torch.distributed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import auto_class, logits_of
from safetensors.torch import load_file
from transformers import AutoProcessor

from tlq_hf import TLQConfig
from tlq_hf.arch import decoder_device_map, find_decoder_stack, select_quant_targets, smooth_mappings
from tlq_hf.calibration import layer_loop, smoothing
from tlq_hf.calibration.activations import ActivationStore
from tlq_hf.calibration.capture import capture_layer_inputs, layer_forward
from tlq_hf.calibration.offload import calibration_precision, compute_dtype_for, onloaded
from tlq_hf.calibration.resume import CheckpointMismatchError
from tlq_hf.calibration.stats import STATISTICS, HessianStatistic, StatGroup, shared_input_groups
from tlq_hf.data import build_calibration_set
from tlq_hf.qtypes import QuantScheme
from tlq_hf.solvers import LAYER_SOLVERS, LayerSolver, gptq, gptq_factor, gptq_quantize, weighted_hessian
from tlq_hf.testing.tiny_models import sample_rows

FAMILY = "qwen2_vl"
ROWS = 6


def _config(**kw) -> TLQConfig:
    return TLQConfig(bits=4, group_size=128, dataset=sample_rows(ROWS), num_samples=ROWS, **kw)


def _saved(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_same_checkpoint(a, b) -> None:
    x, y = _saved(a), _saved(b)
    assert set(x) == set(y)
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def reference(tiny_vlm_dirs, tmp_path_factory):
    """The in-memory TLQ run every other path must reproduce, saved."""
    model = auto_class().from_pretrained(tiny_vlm_dirs[FAMILY], dtype=torch.float32, quantization_config=_config())
    out = tmp_path_factory.mktemp("reference")
    model.save_pretrained(out)
    return out


def test_disk_offloaded_device_map_equals_in_memory(tiny_vlm_dirs, reference, batch_for, tmp_path):
    """Layers the map puts on disk are calibrated one at a time and go back to disk packed (the offload
    folder's ``tlq-packed/``, loaded by their hooks per forward): same checkpoint, same outputs."""
    path = tiny_vlm_dirs[FAMILY]
    config = auto_class().from_pretrained(path).config
    with torch.device("meta"):
        device_map = decoder_device_map(auto_class().from_config(config))
    assert sorted(set(device_map.values())) == ["cpu", "disk"]
    acts = tmp_path / "acts"
    model = auto_class().from_pretrained(
        path,
        dtype=torch.float32,
        device_map=device_map,
        offload_folder=str(tmp_path / "weights"),
        quantization_config=_config(offload_dir=acts),
    )
    assert model.tlq_report.layers and not os.listdir(acts)  # spilled activations cleaned up
    stack = find_decoder_stack(model)
    assert {t.device.type for t in stack.layers.state_dict().values()} == {"meta"}  # packed layers back on disk
    assert len(list((tmp_path / "weights" / "tlq-packed").glob("*.safetensors"))) == len(stack.layers)
    model.save_pretrained(tmp_path / "out")
    _assert_same_checkpoint(reference, tmp_path / "out")
    in_memory = auto_class().from_pretrained(reference, dtype=torch.float32)
    batch = batch_for(FAMILY)
    torch.testing.assert_close(logits_of(model, batch), logits_of(in_memory, batch), rtol=1e-4, atol=1e-5)


def test_disk_offloaded_layers_save_natively_and_checkpoint_from_disk(tiny_vlm_dirs, batch_for, tmp_path):
    """The native format and per-layer resume checkpoints read the packed layers back from ``tlq-packed/``."""
    path = tiny_vlm_dirs[FAMILY]
    config = auto_class().from_pretrained(path).config
    with torch.device("meta"):
        device_map = decoder_device_map(auto_class().from_config(config))
    model = auto_class().from_pretrained(
        path,
        dtype=torch.float32,
        device_map=device_map,
        offload_folder=str(tmp_path / "weights"),
        quantization_config=_config(save_format="tlq", checkpoint_dir=str(tmp_path / "ckpt")),
    )
    assert '"layers_done": 2' in (tmp_path / "ckpt" / "manifest.json").read_text()
    model.save_pretrained(tmp_path / "out")
    reloaded = auto_class().from_pretrained(tmp_path / "out", dtype=torch.float32)
    batch = batch_for(FAMILY)
    torch.testing.assert_close(logits_of(model, batch), logits_of(reloaded, batch), rtol=1e-5, atol=1e-6)


def test_recomputed_full_precision_targets_equal_streamed_ones(tiny_vlm_dirs, reference, tmp_path, monkeypatch):
    """The reference streams the gradient pass's boundaries as targets; without them the loop recomputes."""
    from tlq_hf.calibration import importance, pipeline

    kept = []
    real = importance.gradient_importance

    def spy(*args, **kwargs):
        grad = real(*args, **kwargs)
        kept.append(grad.boundaries is not None)
        return grad

    monkeypatch.setattr(pipeline, "gradient_importance", spy)
    monkeypatch.setattr(pipeline, "IN_MEMORY_BOUNDARIES", 0)
    model = auto_class().from_pretrained(tiny_vlm_dirs[FAMILY], dtype=torch.float32, quantization_config=_config())
    assert kept == [False]
    model.save_pretrained(tmp_path / "out")
    _assert_same_checkpoint(reference, tmp_path / "out")


def test_bf16_model_calibrates_in_float32_on_cpu_and_keeps_its_dtype(tiny_vlm_dirs):
    model = auto_class().from_pretrained(tiny_vlm_dirs[FAMILY], dtype=torch.bfloat16, quantization_config=_config())
    stack = find_decoder_stack(model)
    dtypes = {t.dtype for t in stack.layers.state_dict().values() if t.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    assert all(r.error_after < 0.05 for r in model.tlq_report.layers)


def test_compute_dtype_follows_the_calibration_precision(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    monkeypatch.setenv("TLQ_CPU_BF16", "0")  # an AVX2 CPU: half precision computes in float32
    assert [compute_dtype_for(cpu, d) for d in (bf16, fp16, fp32)] == [fp32, fp32, fp32]
    assert compute_dtype_for(gpu, bf16) == bf16 and compute_dtype_for(gpu, fp16) == fp16
    monkeypatch.setenv("TLQ_CPU_BF16", "1")  # AVX512-BF16 / AMX: bf16 stays (fp16 has no native CPU matmul)
    assert [compute_dtype_for(cpu, d) for d in (bf16, fp16, fp32)] == [bf16, fp32, fp32]
    with calibration_precision("float32"):
        assert compute_dtype_for(cpu, bf16) == fp32 and compute_dtype_for(gpu, bf16) == fp32
    assert compute_dtype_for(cpu, bf16) == bf16  # the block ended
    with pytest.raises(ValueError, match="auto"), calibration_precision("bfloat16"):
        pass
    with pytest.raises(ValueError, match=r"calibration_dtype='bf16'.*'auto', 'float32'"):
        TLQConfig(calibration_dtype="bf16")


def test_bf16_model_calibrates_in_bf16_on_a_cpu_with_native_bf16(tiny_vlm_dirs, tmp_path, monkeypatch):
    """Where the CPU has native bf16 matmuls (forced here) a bf16 model's layers calibrate in bf16, close to the
    float32 result; ``calibration_dtype="float32"`` there reproduces the float32 checkpoint bit for bit."""
    seen = []
    real = layer_loop.layer_forward

    def spy(layer, x, kwargs):
        seen.append((x.dtype, *sorted({str(p.dtype) for p in layer.parameters()})))
        return real(layer, x, kwargs)

    monkeypatch.setattr(layer_loop, "layer_forward", spy)

    def run(name, **kw):
        seen.clear()
        model = auto_class().from_pretrained(
            tiny_vlm_dirs[FAMILY], dtype=torch.bfloat16, quantization_config=_config(**kw)
        )
        model.save_pretrained(tmp_path / name)
        return model.tlq_report, set(seen)

    fp32, fp32_seen = run("fp32")
    monkeypatch.setenv("TLQ_CPU_BF16", "1")
    bf16, bf16_seen = run("bf16")
    forced, forced_seen = run("forced", calibration_dtype="float32")
    assert (fp32.compute_dtype, bf16.compute_dtype, forced.compute_dtype) == ("float32", "bfloat16", "float32")
    # float32: norms upcast, linears' bf16 weights cast per call (scratch bands); bf16: nothing upcast
    assert fp32_seen == forced_seen == {(torch.float32, "torch.bfloat16", "torch.float32")}
    assert bf16_seen == {(torch.bfloat16, "torch.bfloat16")}
    _assert_same_checkpoint(tmp_path / "fp32", tmp_path / "forced")
    x, y = _saved(tmp_path / "fp32"), _saved(tmp_path / "bf16")
    assert any(not torch.equal(x[k], y[k]) for k in x if k.endswith("weight_packed"))
    for a, b in zip(fp32.layers, bf16.layers):
        assert b.error_after < 0.05 and abs(b.error_after - a.error_after) <= 0.25 * a.error_after + 1e-4


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from tlq_hf import TLQConfig
    from tlq_hf.calibration import resume
    from tlq_hf.testing.tiny_models import sample_rows
    from tlq_hf.testing.tiny_models import load_auto_class

    path, ckpt, out, kill = sys.argv[1:5]
    if kill == "1":
        commit = resume.LayerCheckpoint.commit

        def commit_then_die(self, state, layer):
            commit(self, state, layer)
            os.kill(os.getpid(), signal.SIGKILL)

        resume.LayerCheckpoint.commit = commit_then_die
    if kill == "2":  # die half-way through writing layer 1's checkpoint file (a torn temporary file is left)
        real_save = resume.save_file

        def torn_save(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if "layer-00001" in path:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        resume.save_file = torn_save
    cfg = TLQConfig(bits=int(sys.argv[5]), group_size=128, dataset=sample_rows({rows}), num_samples={rows},
                    checkpoint_dir=ckpt)
    model = load_auto_class().from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    model.save_pretrained(out)
    """
).format(rows=ROWS)


def _run_kill_script(tmp_path, path, ckpt, out, kill: bool | str, bits: int = 4):
    """``kill``: True/"1" SIGKILL after layer 0's checkpoint, "2" in the middle of writing layer 1's."""
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    kill = {True: "1", False: "0"}.get(kill, kill)
    cmd = [sys.executable, str(script), path, str(ckpt), str(out), kill, str(bits)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_equals_uninterrupted(tiny_vlm_dirs, reference, tmp_path):
    path, ckpt = tiny_vlm_dirs[FAMILY], tmp_path / "ckpt"
    killed = _run_kill_script(tmp_path, path, ckpt, tmp_path / "never", kill=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "never").exists()
    assert '"layers_done": 1' in (ckpt / "manifest.json").read_text()
    resumed = _run_kill_script(tmp_path, path, ckpt, tmp_path / "out", kill=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "1 layer(s) finished" in resumed.stderr
    _assert_same_checkpoint(reference, tmp_path / "out")
    # the same folder with another config is refused, not mixed
    other = _run_kill_script(tmp_path, path, ckpt, tmp_path / "other", kill=False, bits=3)
    assert other.returncode != 0 and "CheckpointMismatchError" in other.stderr


def test_sigkill_while_writing_a_checkpoint_file_then_resume_equals_uninterrupted(tiny_vlm_dirs, reference, tmp_path):
    path, ckpt = tiny_vlm_dirs[FAMILY], tmp_path / "ckpt"
    killed = _run_kill_script(tmp_path, path, ckpt, tmp_path / "never", kill="2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(ckpt.glob(".layer-00001.safetensors.tmp-*"))  # the torn write is there, under its temporary name
    assert not (ckpt / "layer-00001.safetensors").exists()
    assert '"layers_done": 1' in (ckpt / "manifest.json").read_text()
    resumed = _run_kill_script(tmp_path, path, ckpt, tmp_path / "out", kill=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 layer(s) finished" in resumed.stderr
    _assert_same_checkpoint(reference, tmp_path / "out")


def test_checkpoint_of_another_config_is_refused_in_process(tiny_vlm_dirs, tmp_path):
    path = tiny_vlm_dirs[FAMILY]
    auto_class().from_pretrained(path, dtype=torch.float32, quantization_config=_config(checkpoint_dir=tmp_path))
    with pytest.raises(CheckpointMismatchError, match="different model, data set or TLQConfig"):
        auto_class().from_pretrained(
            path, dtype=torch.float32, quantization_config=_config(checkpoint_dir=tmp_path, damp=0.05)
        )


_DIST_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    from tlq_hf import TLQConfig
    from tlq_hf.testing.tiny_models import sample_rows
    from tlq_hf.testing.tiny_models import load_auto_class

    torch.set_num_threads(1)
    path, out, method, preset = sys.argv[1:5]
    scheme = dict(bits=4, group_size=128) if preset == "int" else dict(scheme=preset)
    cfg = TLQConfig(**scheme, dataset=sample_rows(8), num_samples=8, method=method, token_fraction=0.5)
    model = load_auto_class().from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(out)
    if dist.is_initialized():
        assert dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    """
)


@pytest.mark.parametrize(
    "method, preset",
    # the float grids: E4M3 scales and codes travel as bytes (gloo has no float8), NVFP4's calibrated activation
    # range is the maximum over the ranks, MXFP4's scales are uint8 exponents
    [("tlq", "int"), ("mbq", "int"), ("gptaq", "int"), ("tlq", "NVFP4"), ("gptq", "MXFP4A16")],
)
def test_two_processes_equal_one(tiny_vlm_dirs, tmp_path, method, preset):
    """Same threads per process: the 2-rank gloo run writes the 1-process checkpoint bit for bit."""
    script = tmp_path / "dist.py"
    script.write_text(_DIST_SCRIPT)
    path = tiny_vlm_dirs[FAMILY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "one"), method, preset],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(script), path, str(tmp_path / "two"), method, preset],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_activation_store_spills_to_disk_and_holds_nothing_in_memory(tmp_path):
    tensors = [torch.randn(1, 5 + i, 8, dtype=torch.bfloat16) for i in range(3)]
    memory = ActivationStore.of(tensors)
    disk = ActivationStore.of(tensors, tmp_path)
    assert memory.resident_bytes() == sum(t.numel() * 2 for t in tensors) and disk.resident_bytes() == 0
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    for a, b, t in zip(memory, disk, tensors):
        assert torch.equal(a, t) and torch.equal(b, t) and b.dtype == torch.bfloat16
    disk.close()
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("kind", sorted(STATISTICS))
def test_statistic_rescale_equals_statistic_of_rescaled_inputs(kind):
    """A smoothing fold divides the inputs by s: every statistic must follow (the stale-Hessian bug)."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(7 + i, 16, generator=gen) for i in range(3)]
    ws = [torch.rand(7 + i, generator=gen) for i in range(3)]
    refs = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in xs]  # paired statistics' full-precision inputs
    s = torch.rand(16, generator=gen) + 0.5
    folded, direct = STATISTICS[kind](rows_per_sample=5), STATISTICS[kind](rows_per_sample=5)
    for j, (x, a, r) in enumerate(zip(xs, ws, refs)):
        folded.update(x, a, j, reference=r)
        direct.update(x / s, a, j, reference=r / s)
    folded.rescale(s)
    for key, value in direct.state_dict().items():
        assert torch.allclose(folded.state_dict()[key].double(), value.double(), rtol=1e-5, atol=1e-6), key
    roundtrip = STATISTICS[kind](rows_per_sample=5)
    roundtrip.load_state_dict(folded.state_dict())
    for key, value in folded.state_dict().items():
        assert torch.equal(roundtrip.state_dict()[key], value)


def test_onloaded_release_gives_a_swapped_out_module_its_original_tensors_back():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    originals = [m.weight for m in layer]
    with onloaded(layer) as on:
        assert [m.weight.dtype for m in layer] == [torch.float32, torch.float32]  # CPU computes half in float32
        on.release(layer[0])
        assert layer[0].weight is originals[0] and layer[1].weight.dtype == torch.float32
    assert [m.weight for m in layer] == originals


def test_hessian_lower_triangle_blocks_sum_in_float64_and_are_released_while_normalising(monkeypatch):
    monkeypatch.setattr(HessianStatistic, "ROW_BLOCK", 40)  # 4 lower-triangle blocks for 16 columns
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(9, 16, generator=gen) for _ in range(3)]
    ws = [torch.rand(9, generator=gen) for _ in range(3)]
    stat = HessianStatistic()
    for j, (x, a) in enumerate(zip(xs, ws)):
        stat.update(x, a, j)
    shapes = [tuple(b.shape) for b in stat.blocks]
    assert len(shapes) > 2 and shapes[0][0] == shapes[0][1] and shapes[-1][1] == 16  # rows [r0, r1) x cols [0, r1)
    assert sum(r * c for r, c in shapes) < 16 * 16 * 0.8 and stat.blocks[0].dtype == torch.float64
    expected = sum(((x * a[:, None]).T @ x).double() for x, a in zip(xs, ws))
    assert torch.allclose(stat.sum, expected, rtol=1e-6, atol=1e-6)  # float32 products (blocked GEMM rounding)
    mass = float(sum(a.double().sum() for a in ws))
    normalized = stat.normalized()
    assert normalized.dtype == torch.float32 and torch.equal(normalized, normalized.T)
    assert torch.allclose(normalized.double(), expected / mass, rtol=1e-5, atol=1e-6)
    assert torch.equal(stat.take_normalized(), normalized) and stat.blocks is None


def test_smoothing_with_gptq_solver_rescales_the_hessian(tiny_vlm_dirs, monkeypatch):
    """method=awq, solver=gptq: GPTQ must solve with the Hessian of the smoothed inputs."""
    seen = []
    solve = LAYER_SOLVERS["gptq"].solve

    def checking_solve(weights, group, scheme, cfg, dtype):
        seen.append((group.members, group.stats["hessian"].normalized()))
        return solve(weights, group, scheme, cfg, dtype)

    checking = {**LAYER_SOLVERS, "gptq": LayerSolver("gptq", ("hessian",), checking_solve)}
    monkeypatch.setattr(layer_loop, "LAYER_SOLVERS", checking)
    recorded: dict[str, torch.Tensor] = {}
    original_rescale = StatGroup.rescale

    def recording_rescale(self, s):
        recorded[self.members[0]] = s.clone()
        original_rescale(self, s)

    monkeypatch.setattr(StatGroup, "rescale", recording_rescale)
    path = tiny_vlm_dirs[FAMILY]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    full = {n: m.weight.detach().clone() for n, m in select_quant_targets(model, None).items()}
    auto_class().from_pretrained(
        path, dtype=torch.float32, quantization_config=_config(method="awq", solver="gptq", exposed=False)
    )
    assert recorded, "no smoothing fold happened"
    rescaled = [(members, h) for members, h in seen if members[0] in recorded]
    assert rescaled
    # the layer-0 q/k/v group: recompute its Hessian from the FP inputs divided by the fold's scale
    samples = build_calibration_set(sample_rows(ROWS), AutoProcessor.from_pretrained(path), ROWS)
    stack = find_decoder_stack(model)
    captured = capture_layer_inputs(model, stack, samples)
    members, h_used = next((m, h) for m, h in rescaled if m[0].startswith(stack.layer_prefix(0) + "."))
    inputs = []
    module = model.get_submodule(members[0])
    handle = module.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for c in captured:
            layer_forward(stack.layers[0], c.hidden, c.kwargs)
    handle.remove()
    expected = weighted_hessian(torch.cat(inputs) / recorded[members[0]])
    assert torch.allclose(h_used, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert full  # weights existed


@pytest.mark.parametrize(
    "family, offset, rejected",
    [("llava", 0.0, set()), ("gemma3", 1.0, {"post_attention_layernorm"})],
)
def test_smoothing_folds_only_where_the_layer_output_is_unchanged(tiny_vlm_dirs, family, offset, rejected):
    """Gemma 3's norms scale by ``1 + weight`` and its ``post_attention_layernorm`` normalises the attention output
    (the MLP reads ``pre_feedforward_layernorm``): the fold check rejects that mapping, and the folds it accepts
    (with real, non-power-of-two scales) leave the layer's output unchanged."""
    path = tiny_vlm_dirs[family]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    stack = find_decoder_stack(model)
    samples = build_calibration_set(sample_rows(1), AutoProcessor.from_pretrained(path), 1)
    (c,) = capture_layer_inputs(model, stack, samples)
    layer = stack.layers[1]
    names = dict(layer.named_modules())

    def run_one():
        return layer_forward(layer, c.hidden, c.kwargs_for(1))

    mappings = smooth_mappings(model, layer)
    assert smoothing.weight_offset(names[mappings[0][0]]) == offset
    verdicts = {p: smoothing.folds_preserve_output(layer, p, cs, run_one) for p, cs in mappings}
    assert {p for p, ok in verdicts.items() if not ok} == rejected
    reference = run_one()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for producer, consumers in mappings:
            if verdicts[producer]:
                s = 0.5 + 1.5 * torch.rand(names[consumers[0]].weight.shape[1], generator=gen)
                smoothing.fold(names[producer], [names[n] for n in consumers], s)
        assert torch.allclose(run_one(), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_modules_sharing_an_input_share_one_statistic_and_factorisation(tiny_vlm_dirs):
    path = tiny_vlm_dirs[FAMILY]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    stack = find_decoder_stack(model)
    samples = build_calibration_set(sample_rows(2), AutoProcessor.from_pretrained(path), 2)
    captured = capture_layer_inputs(model, stack, samples)
    prefix = stack.layer_prefix(0) + "."
    modules = {n: m for n, m in select_quant_targets(model, None).items() if n.startswith(prefix)}
    with torch.no_grad():
        groups = shared_input_groups(
            modules, lambda: layer_forward(stack.layers[0], captured[0].hidden, captured[0].kwargs)
        )
    short = [[n[len(prefix) :] for n in g] for g in groups]
    assert short == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # one factorisation reused for q/k/v gives exactly the codes of three separate GPTQ runs
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    hessian = weighted_hessian(x)
    scheme = QuantScheme(bits=3, group_size=128, sym=True)
    factor = gptq_factor(hessian, damp=0.01, act_order=True)
    for name in groups[0]:
        w = modules[name].weight.detach()
        shared_codes, shared_qp = gptq_quantize(w, factor, scheme)
        codes, qp = gptq(w, hessian, scheme, damp=0.01, act_order=True)
        assert torch.equal(shared_codes, codes) and torch.equal(shared_qp.scale, qp.scale)


def test_gradient_pass_with_spilled_boundaries_equals_in_memory(tiny_vlm_dirs, tmp_path):
    from tlq_hf.calibration.importance import gradient_importance

    path = tiny_vlm_dirs["llava"]
    model = auto_class().from_pretrained(path, dtype=torch.float32)
    stack = find_decoder_stack(model)
    samples = build_calibration_set(sample_rows(3), AutoProcessor.from_pretrained(path), 3)
    captured = capture_layer_inputs(model, stack, samples)
    targets = select_quant_targets(model, None)
    memory = gradient_importance(model, stack, captured, targets)
    spilled = gradient_importance(model, stack, captured, targets, spill_dir=str(tmp_path))
    assert not list(tmp_path.rglob("*.safetensors"))  # every boundary and gradient file dropped after use
    assert memory.loss == spilled.loss
    for name in targets:
        assert all(torch.equal(a, b) for a, b in zip(memory.raw[name], spilled.raw[name]))


def test_statistic_passes_keep_shared_inputs_together_and_put_the_largest_last():
    def group(name, source):
        return StatGroup([name], input_of=source)

    groups = [
        group("q", "q"),
        group("k", "q"),
        group("v", "q"),
        group("o", "o"),
        group("gate", "gate"),
        group("up", "gate"),
        group("down", "down"),
    ]
    size = {"q": 10, "k": 10, "v": 10, "o": 10, "gate": 10, "up": 10, "down": 100}
    footprint = lambda g: size[g.members[0]]  # noqa: E731
    assert layer_loop.statistic_passes(groups, footprint, budget=1000) == [list(range(7))]
    # the largest input alone sets the capacity: the rest share one pass, run first
    assert layer_loop.statistic_passes(groups, footprint, budget=0) == [[0, 1, 2, 3, 4, 5], [6]]
    # a budget below one shared input's total never splits that input
    assert layer_loop.statistic_passes(groups[:6], footprint, budget=25) == [[3, 4, 5], [0, 1, 2]]
    # groups of different bins (experts modules) never share a pass when several are needed; one pass still fits all
    bins = lambda g: "experts" if g.members[0] in ("gate", "up", "down") else None  # noqa: E731
    assert layer_loop.statistic_passes(groups, footprint, budget=0, bin_of=bins) == [[4, 5], [0, 1, 2, 3], [6]]
    assert layer_loop.statistic_passes(groups, footprint, budget=1000, bin_of=bins) == [list(range(7))]
    # everything within ONE_PASS_SLACK of the largest input: one pass whatever the budget (a dense layer's down_proj)
    size.update(q=3, k=3, v=3, o=3, gate=3, up=3)
    assert 100 * layer_loop.ONE_PASS_SLACK >= sum(size.values())
    assert layer_loop.statistic_passes(groups, footprint, budget=0) == [list(range(7))]


def test_a_collector_that_needs_no_output_stops_the_forward_once_its_hooks_fired_as_often_as_probed():
    from tlq_hf.calibration.stats import StatCollector

    gen = torch.Generator().manual_seed(0)
    a, b, tail = (torch.nn.Linear(4, 4) for _ in range(3))
    ran = []
    tail.register_forward_pre_hook(lambda m, args: ran.append("tail"))

    def forward(x):  # ``a`` reads twice, then ``b``, then the part no statistic reads
        return tail(b(a(a(x))))

    modules = {"a": a, "b": b, "tail": tail}
    calls: dict[str, int] = {}
    assert shared_input_groups(modules, lambda: forward(torch.randn(2, 4, generator=gen)), calls) == [
        ["a"],
        ["b"],
        ["tail"],
    ]
    assert calls == {"a": 2, "b": 1, "tail": 1}
    ran.clear()

    def collected(complete: bool, calls: dict[str, int] | None) -> tuple[object, torch.Tensor]:
        groups = [StatGroup(["a"], {"hessian": HessianStatistic()}), StatGroup(["b"], {"hessian": HessianStatistic()})]
        collector = StatCollector(groups, modules, None, calls=calls)
        collector.begin(0, [None, None])
        out = collector.run(lambda: forward(torch.ones(3, 4)), complete=complete)
        collector.close()
        return out, groups[0].stats["hessian"].sum

    whole, h_whole = collected(True, calls)
    assert whole is not None and ran == ["tail"]
    ran.clear()
    stopped, h_stopped = collected(False, calls)
    assert stopped is None and ran == []  # ``tail`` never ran
    assert torch.equal(h_stopped, h_whole)  # both calls of ``a`` were seen before the stop
    unknown, _ = collected(False, None)  # no probe counts: the forward runs to its end
    assert unknown is not None and ran == ["tail"]


def test_statistics_collected_in_several_passes_give_the_same_checkpoint(
    tiny_vlm_dirs, reference, tmp_path, monkeypatch
):
    """A layer whose statistics exceed the budget is calibrated in passes (largest input last): same codes. Only the
    pass reading the layer's last input (the down projection's) runs the whole layer: the others stop once their
    inputs were seen, so the down projection runs as often as in the one-pass run."""
    import functools

    from tlq_hf.calibration import pipeline

    def down_calls(monkeypatch, budget: int | None) -> tuple[int, object]:
        calls = [0]
        real_forward = torch.nn.Linear.forward

        def counting(self, x):
            calls[0] += getattr(self, "_is_down", False)
            return real_forward(self, x)

        real_groups = layer_loop.LayerLoop._groups

        def marking(self, modules, run_one, calls_out):
            for name, m in modules.items():
                m._is_down = name.endswith("mlp.down_proj")
            return real_groups(self, modules, run_one, calls_out)

        with monkeypatch.context() as m:
            if budget is not None:
                settings = functools.partial(layer_loop.LayerSettings, statistics_budget=budget)
                m.setattr(pipeline, "LayerSettings", settings)
                m.setattr(layer_loop, "statistic_passes", spy)
            m.setattr(torch.nn.Linear, "forward", counting)
            m.setattr(layer_loop.LayerLoop, "_groups", marking)
            model = auto_class().from_pretrained(
                tiny_vlm_dirs[FAMILY], dtype=torch.float32, quantization_config=_config()
            )
        return calls[0], model

    seen = []
    real = layer_loop.statistic_passes

    def spy(groups, footprint, budget, bin_of=None):
        passes = real(groups, footprint, budget, bin_of)
        seen.append([sum(footprint(groups[k]) for k in p) for p in passes])
        return passes

    one_pass_calls, _ = down_calls(monkeypatch, None)
    calls, model = down_calls(monkeypatch, 0)
    assert seen and all(len(p) > 1 for p in seen)
    assert all(max(p) == p[-1] for p in seen)  # the largest pass last
    assert one_pass_calls > 0 and calls == one_pass_calls
    model.save_pretrained(tmp_path / "out")
    _assert_same_checkpoint(reference, tmp_path / "out")


@pytest.mark.parametrize("source", ["safetensors", "dat"])
def test_offloaded_head_is_read_a_slice_at_a_time_with_the_same_loss_and_gradient(tmp_path, source, monkeypatch):
    """An lm_head left on disk by the device map is read in vocabulary slices (never whole) by the gradient
    pass: the slices are the stored rows, and the loss and gradient equal those of the resident head."""
    from accelerate import disk_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, set_module_tensor_to_device
    from safetensors.torch import save_file
    from torch import nn

    from tlq_hf.calibration import offload
    from tlq_hf.calibration.importance import _head_loss_and_grad

    gen = torch.Generator().manual_seed(0)
    resident = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        resident.weight.copy_(torch.randn(50, 16, generator=gen))
    head = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    head.load_state_dict(resident.state_dict())
    if source == "dat":
        holder = nn.Sequential(head)
        disk_offload(holder, str(tmp_path))
    else:
        save_file({"lm.weight": resident.weight.detach().clone()}, tmp_path / "shard.safetensors")
        index = {
            "lm.weight": {
                "safetensors_file": str(tmp_path / "shard.safetensors"),
                "weight_name": "lm.weight",
                "dtype": "bfloat16",
            }
        }
        loader = OffloadedWeightsLoader(index=index)
        set_module_tensor_to_device(head, "weight", "meta")
        add_hook_to_module(head, AlignDevicesHook("cpu", offload=True, weights_map=PrefixedDataset(loader, "lm.")))
    assert head.weight.device.type == "meta"

    def whole(*_):
        raise AssertionError("the whole offloaded tensor was read")

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", whole)
    rows = offload.row_reader(head)
    assert torch.equal(rows(7, 19), resident.weight[7:19]) and rows(7, 19).dtype == torch.bfloat16
    x = torch.randn(6, 16, generator=gen)
    targets = torch.tensor([0, 7, 13, 49, 21, 30])
    weights = torch.full((6,), 1 / 6)
    loss, grad = _head_loss_and_grad(x, head, targets, weights, torch.float32, chunk=8)
    ref_loss, ref_grad = _head_loss_and_grad(x, resident, targets, weights, torch.float32, chunk=8)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_onloading_an_offloaded_module_reads_each_tensor_once(tmp_path, monkeypatch):
    """A ``Mapping``'s ``in`` reads the tensor to answer; onloading asks the offload index instead."""
    from accelerate import disk_offload
    from accelerate.utils import OffloadedWeightsLoader
    from torch import nn

    layer = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    expected = {k: v.clone() for k, v in layer.state_dict().items()}
    disk_offload(layer, str(tmp_path))
    reads = []
    real = OffloadedWeightsLoader.__getitem__

    def count(self, key):
        reads.append(key)
        return real(self, key)

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", count)
    with onloaded(layer) as on:
        assert on.device.type == "cpu"
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in expected.items())
    assert sorted(reads) == sorted(expected)


def test_scratch_upcast_computes_in_float32_a_band_of_rows_at_a_time(monkeypatch):
    """``onloaded(scratch=True)``: bf16 linears keep bf16 storage, each call casts its weight a band of rows at
    a time into one small shared float32 buffer; outputs equal the fully upcast layer's (float32 rounding); the
    buffer never holds a whole weight; refused under autograd (the buffer is reused); hooks still run."""
    from torch import nn

    from tlq_hf.calibration import offload

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32), nn.LayerNorm(32)).to(torch.bfloat16)
    x = torch.randn(3, 5, 32)
    with torch.no_grad(), onloaded(layer) as on:
        assert on.compute_dtype == torch.float32 and layer[0].weight.dtype == torch.float32
        full = layer(x)
    monkeypatch.setattr(offload, "SCRATCH_ELEMENTS", 32 * 20)  # bands of 20 / 10 rows: uneven last band
    allocated = []
    real_empty = torch.empty

    def spy_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        allocated.append(t.numel())
        return t

    seen = []
    with torch.no_grad(), onloaded(layer, scratch=True):
        spies = [m.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype)) for m in (layer[0], layer[2])]
        assert layer[0].weight.dtype == layer[2].weight.dtype == torch.bfloat16  # stored dtype kept
        assert layer[3].weight.dtype == torch.float32  # non-linear tensors are upcast as before
        monkeypatch.setattr(torch, "empty", spy_empty)
        out = layer(x)
        monkeypatch.setattr(torch, "empty", real_empty)
        assert layer[2].weight.dtype == torch.bfloat16
        for spy in spies:
            spy.remove()
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)  # float32 summation order only
    assert seen == [torch.bfloat16] * 2  # hooks see the stored weight; the float32 bands are internal
    assert allocated and max(allocated) <= 32 * 20 < 64 * 32  # never a whole float32 weight
    with onloaded(layer, scratch=True), pytest.raises(RuntimeError, match="no_grad"):
        layer(x)
    assert layer[0].weight.dtype == torch.bfloat16 and "forward" not in layer[0].__dict__
