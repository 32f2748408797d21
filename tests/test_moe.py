"""Mixture-of-experts decoders: experts quantized by every method, routers kept, nothing float silently, and
checkpoints that reload to the in-memory logits (Qwen3-VL-MoE, Qwen3.5-MoE, Llama 4, DeepSeek-V3)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers
from _helpers import auto_class, logits_of
from safetensors import safe_open
from torch import nn

from tlq_hf import TLQConfig, quantize
from tlq_hf.arch import kept_by_role, swap_module
from tlq_hf.coverage import UnquantizedWeightError
from tlq_hf.experts import UnfusedExperts, unfuse_experts
from tlq_hf.nn import TLQLinear
from tlq_hf.testing.tiny_models import sample_rows

pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="MoE support reads transformers 5's experts interface"
)

_TEXT = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, head_dim=64)


def _build(kind: str) -> nn.Module:
    """A tiny random MoE model of transformers' own class (4 experts), weights N(0, 0.05)."""
    if kind == "qwen3_5_moe":
        cfg = transformers.Qwen3_5MoeConfig(
            text_config=dict(
                _TEXT,
                hidden_size=256,
                moe_intermediate_size=128,
                shared_expert_intermediate_size=128,
                num_experts=4,
                num_experts_per_tok=2,
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=64,
                linear_value_head_dim=64,
            ),
            vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256),
        )
        model = transformers.Qwen3_5MoeForConditionalGeneration(cfg)
    elif kind == "llama4":
        cfg = transformers.Llama4Config(
            text_config=dict(
                _TEXT,
                hidden_size=256,
                intermediate_size=128,
                intermediate_size_mlp=256,
                num_local_experts=4,
                num_experts_per_tok=1,
                interleave_moe_layer_step=1,
            ),
            vision_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
                vision_output_dim=64,
                projector_input_dim=64,
                projector_output_dim=64,
            ),
        )
        model = transformers.Llama4ForConditionalGeneration(cfg)
    elif kind == "deepseek_v3":  # Kimi-K2.5's text decoder: DeepSeek-V3 MoE with MLA attention
        cfg = transformers.DeepseekV3Config(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
            q_lora_rank=128,
            kv_lora_rank=128,
            qk_rope_head_dim=32,
            qk_nope_head_dim=64,
            v_head_dim=64,
            n_group=1,
            topk_group=1,
        )
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in model.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.05)
    return model.eval()


KINDS = ("qwen3_5_moe", "llama4", "deepseek_v3")


def _loader(kind: str):
    return transformers.AutoModelForCausalLM if kind == "deepseek_v3" else auto_class()


IDS = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_experts_compute_what_the_fused_ones_do(kind):
    model = _build(kind)
    before = _logits(model)
    names = unfuse_experts(model, "", lambda n, m: swap_module(model, n, m))
    assert names and all(isinstance(model.get_submodule(n), UnfusedExperts) for n in names)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_quantizes_experts_keeps_routers_and_reloads(kind, tmp_path):
    """Quantize on load, save (compressed-tensors), reload with transformers to the same logits; every expert
    projection written under its per-expert name and quantized, routers and gates not."""
    _build(kind).save_pretrained(tmp_path / "fp")
    model = _loader(kind).from_pretrained(tmp_path / "fp", quantization_config=TLQConfig(group_size=64, method="rtn"))
    experts = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    assert experts
    for name in experts:
        for e in range(len(model.get_submodule(name))):
            assert isinstance(model.get_submodule(f"{name}.{e}.down_proj"), TLQLinear)
            assert isinstance(model.get_submodule(f"{name}.{e}.up_proj"), TLQLinear)
    kept = kept_by_role(model)
    assert kept and all(not isinstance(model.get_submodule(n), TLQLinear) for n in kept)
    expected = _logits(model)  # the first forward after quantization works (Llama 4's router returns a tuple)
    coverage = model.tlq_report.coverage
    assert coverage.quantized > 0.9 * coverage.total and any("router" in r or "forward" in r for r in coverage.kept)
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    packed = {k for k in keys if re.search(r"experts\.\d+\.(gate|up|down)_proj\.weight_packed$", k)}
    assert len(packed) == 3 * 4 * len(experts)
    assert not any(re.search(r"experts\.(gate_up_proj|down_proj)$", k) for k in keys)
    reloaded = _loader(kind).from_pretrained(tmp_path / "q")
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-4, atol=1e-4)


def test_qwen3_5_moe_scalar_gate_is_kept_and_named_in_the_ignore_list(tmp_path):
    model = _build("qwen3_5_moe")
    quantize(model, TLQConfig(group_size=64, method="rtn"))
    gates = [n for n, r in kept_by_role(model).items() if r.startswith("scalar gate")]
    assert gates and all(n.endswith("shared_expert_gate") for n in gates)
    model.save_pretrained(tmp_path)
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert all(any(re.match(p[3:], g) for p in ignore) for g in gates)


@pytest.fixture(scope="module")
def moe_vlm(tiny_vlm_dirs):
    return tiny_vlm_dirs["qwen3_vl_moe"]


@pytest.mark.parametrize("method", ["gptq", "tlq", "gptaq", "awq", "mbq"])
def test_every_method_calibrates_experts_on_their_routed_tokens(moe_vlm, method, batch_for):
    cfg = TLQConfig(method=method, dataset=sample_rows(6), num_samples=6)
    model = auto_class().from_pretrained(moe_vlm, quantization_config=cfg)
    report = model.tlq_report
    n_packed = sum(isinstance(m, TLQLinear) for n, m in model.named_modules() if ".experts." in n)
    assert n_packed == 2 * 4 * 3
    for layer in report.layers:
        (tokens,) = layer.expert_tokens.values()
        assert sum(tokens) == report.tokens * 2  # top-2: every token reaches two experts
        assert not layer.fallbacks
    assert torch.isfinite(logits_of(model, batch_for("qwen3_vl_moe"))).all()


def test_experts_with_too_few_tokens_fall_back_to_rtn_and_are_listed(moe_vlm):
    cfg = TLQConfig(method="gptq", dataset=sample_rows(4), num_samples=4, expert_min_tokens=10**6)
    report = auto_class().from_pretrained(moe_vlm, quantization_config=cfg).tlq_report
    fallbacks = [f for layer in report.layers for f in layer.fallbacks]
    assert len(fallbacks) == 2 * 4 * 3 and all(".experts." in f for f in fallbacks)
    assert "rounded to nearest" in report.summary()


def test_all_tokens_option_feeds_every_expert_every_token(moe_vlm):
    cfg = TLQConfig(method="gptq", dataset=sample_rows(4), num_samples=4, expert_all_tokens=True)
    report = auto_class().from_pretrained(moe_vlm, quantization_config=cfg).tlq_report
    for layer in report.layers:
        (tokens,) = layer.expert_tokens.values()
        assert tokens == [report.tokens] * 4


def test_a_token_weighs_the_same_in_whichever_expert_it_reaches(moe_vlm):
    """TLQ's raw importance of every expert projection is the gradient at the experts module's output."""
    from tlq_hf.arch import find_decoder_stack, select_quant_targets
    from tlq_hf.calibration.capture import capture_layer_inputs
    from tlq_hf.calibration.importance import gradient_importance
    from tlq_hf.data import build_calibration_set

    model = auto_class().from_pretrained(moe_vlm, dtype=torch.float32)
    unfuse_experts(model, "", lambda n, m: swap_module(model, n, m))
    stack = find_decoder_stack(model)
    targets = select_quant_targets(model, None)
    processor = transformers.AutoProcessor.from_pretrained(moe_vlm)
    samples = build_calibration_set(sample_rows(3), processor, 3, 2048, 0)
    grad = gradient_importance(model, stack, capture_layer_inputs(model, stack, samples), targets)
    prefix = f"{stack.path}.0.mlp.experts"
    for j in range(3):
        ref = grad.raw[f"{prefix}.0.gate_proj"][j]
        assert ref.shape == (samples[j].num_tokens,) and float(ref.sum()) > 0
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(grad.raw[f"{prefix}.{e}.{proj}"][j], ref)
        assert not torch.equal(grad.raw[f"{stack.path}.0.self_attn.o_proj"][j], ref)


def test_qwen3_vl_moe_checkpoint_reloads_with_the_registered_merge(moe_vlm, tmp_path, batch_for):
    cfg = TLQConfig(method="gptq", dataset=sample_rows(4), num_samples=4)
    model = auto_class().from_pretrained(moe_vlm, quantization_config=cfg)
    batch = batch_for("qwen3_vl_moe")
    expected = logits_of(model, batch)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "import tlq_hf" in card and "tokens per expert" in card and "decoder coverage" in card
    reloaded = auto_class().from_pretrained(tmp_path)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, rtol=1e-4, atol=1e-4)


def test_the_registered_merge_leaves_unquantized_saves_in_the_original_fused_layout(moe_vlm, tmp_path, batch_for):
    """With tlq_hf imported, a full-precision Qwen3-VL-MoE still saves fused experts under their full names (the
    merge is load-only) and reloads, from a loaded model and twice over, to the same logits."""
    model = auto_class().from_pretrained(moe_vlm)
    batch = batch_for("qwen3_vl_moe")
    expected = logits_of(model, batch)
    for round_trip in ("a", "b"):
        model.save_pretrained(tmp_path / round_trip)
        keys = [k for f in (tmp_path / round_trip).glob("*.safetensors") for k in safe_open(f, "pt").keys()]
        experts = sorted(k for k in keys if ".experts." in k)
        fused = r"model\.language_model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)"
        assert experts and all(re.fullmatch(fused, k) for k in experts)
        model = auto_class().from_pretrained(tmp_path / round_trip)
        torch.testing.assert_close(logits_of(model, batch), expected, rtol=0, atol=0)


def test_native_format_keeps_experts_packed(moe_vlm, tmp_path, batch_for):
    cfg = TLQConfig(method="rtn", save_format="tlq")
    model = auto_class().from_pretrained(moe_vlm, quantization_config=cfg)
    batch = batch_for("qwen3_vl_moe")
    expected = logits_of(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = auto_class().from_pretrained(tmp_path)
    assert isinstance(reloaded.get_submodule("model.language_model.layers.1.mlp.experts.3.down_proj"), TLQLinear)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


class _OddExperts(nn.Module):
    """Fused experts of no convention tlq_hf knows."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 8, 8))
        self.inner = experts

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_a_decoder_weight_no_rule_covers_is_refused_by_name_before_any_change():
    model = _build("deepseek_v3")
    experts = model.model.layers[1].mlp.experts
    model.model.layers[1].mlp.experts = _OddExperts(experts)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnquantizedWeightError, match=r"layers\.1\.mlp\.experts\.w .*ignore="):
        quantize(model, TLQConfig(method="rtn", group_size=64))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


#: vLLM's ``hf_to_vllm_mapper`` prefixes (vLLM 0.34: qwen3_vl.py, inherited by qwen3_vl_moe.py and qwen3_5.py; Llama 4
#: and DeepSeek-V3 have none: their checkpoint names are vLLM's), and the shards vLLM fuses into one layer
#: (``packed_modules_mapping`` of qwen3_vl_moe.py, qwen3_5.py, mllama4.py, deepseek_v2.py).
VLLM_PREFIXES = {
    "qwen3_vl_moe": {
        "model.visual.": "visual.",
        "lm_head.": "language_model.lm_head.",
        "model.language_model.": "language_model.model.",
    },
    "llama4": {},
    "deepseek_v3": {},
}
VLLM_PREFIXES["qwen3_5_moe"] = VLLM_PREFIXES["qwen3_vl_moe"]
VLLM_FUSED = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
    "in_proj_qkvz": ["in_proj_qkv", "in_proj_z"],
    "in_proj_ba": ["in_proj_b", "in_proj_a"],
    "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
}


def _vllm_name(name: str, kind: str) -> str:
    for old, new in VLLM_PREFIXES[kind].items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


@pytest.mark.parametrize("kind", [*KINDS, "qwen3_vl_moe"])
def test_moe_checkpoint_names_are_the_ones_vllm_loads(kind, tmp_path, moe_vlm):
    """vLLM's compressed-tensors loader, read for MoE: per-expert keys ``<layer>.experts.{e}.{gate,up,down}_proj.``
    (its ``make_expert_params_mapping``; DeepSeek-V3 reads no fused experts), a FusedMoE layer's scheme decided by
    ``<layer>.experts.0.{gate,up,down}_proj`` against ``ignore`` (``re:`` entries by ``re.match``, not remapped),
    and routers that vLLM builds as quantizable linears (Qwen3-VL-MoE's ``mlp.gate``) named in ``ignore``."""
    from test_vllm_names import vllm_ignores

    if kind == "qwen3_vl_moe":
        source, loader = moe_vlm, auto_class()
    else:
        _build(kind).save_pretrained(tmp_path / "fp")
        source, loader = tmp_path / "fp", _loader(kind)
    model = loader.from_pretrained(source, quantization_config=TLQConfig(group_size=64, method="rtn"))
    model.save_pretrained(tmp_path / "q")
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    shapes: dict[str, list[int]] = {}
    for file in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    packed = {_vllm_name(k.rsplit(".", 1)[0], kind) for k in shapes if k.endswith(".weight_packed")}
    matrices = {  # every 2-D weight on disk (linears and routers), under vLLM's name: packed or not
        _vllm_name(k[: -len(".weight")], kind): False
        for k, s in shapes.items()
        if k.endswith(".weight") and len(s) == 2 and "embed" not in k
    }
    matrices.update(dict.fromkeys(packed, True))
    wrong = {n: q for n, q in matrices.items() if vllm_ignores(n, ignore) == q}
    assert not wrong, f"ignore {ignore} disagrees with the packed state of {sorted(wrong)[:4]}"
    assert any(n.endswith(("mlp.gate", "feed_forward.router")) and not q for n, q in matrices.items())

    experts = {m.group(1) for n in packed for m in [re.match(r"(.*\.experts)\.\d+\.(gate|up|down)_proj$", n)] if m}
    assert experts and not any(re.search(r"experts\.(gate_up_proj|down_proj)$", k) for k in shapes)
    n_experts = len(next(m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)))
    for layer in experts:  # vLLM's FusedMoE: one scheme, read off expert 0's three projections, every expert present
        assert not any(vllm_ignores(f"{layer}.0.{p}", ignore) for p in ("gate_proj", "up_proj", "down_proj"))
        assert {f"{layer}.{e}.{p}" for e in range(n_experts) for p in ("gate_proj", "up_proj", "down_proj")} <= packed
    for fused, shards in VLLM_FUSED.items():  # a fused vLLM layer needs every shard to agree
        for name in [n for n in matrices if n.endswith("." + shards[0])]:
            head = name[: -len(shards[0])]
            states = {matrices[head + s] for s in shards if head + s in matrices}
            assert len(states) == 1, f"{head}{fused}: shards {shards} disagree"


def test_activation_quantized_moe_is_refused_for_compressed_tensors_and_kept_natively(tmp_path):
    """transformers cannot merge compressed-tensors' int8 ``weight`` tensors into fused experts: W4A8 on an MoE model
    is refused before any change for that format, and round-trips in the native format."""
    _build("qwen3_5_moe").save_pretrained(tmp_path / "fp")
    cfg = dict(method="rtn", bits=4, group_size=64, act_bits=8)
    with pytest.raises(ValueError, match="save_format='tlq'"):
        auto_class().from_pretrained(tmp_path / "fp", quantization_config=TLQConfig(**cfg))
    model = auto_class().from_pretrained(tmp_path / "fp", quantization_config=TLQConfig(**cfg, save_format="tlq"))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(_logits(auto_class().from_pretrained(tmp_path / "q")), expected, rtol=0, atol=1e-5)


def test_an_experts_gate_and_up_share_one_statistic_under_token_importance(moe_vlm, monkeypatch):
    """TLQ weights an expert's gate and up projections at the experts module's output: the same token weights, so
    one statistic and one factorisation (half the statistics memory of an MoE layer), with exactly the codes that
    one statistic per projection gives."""
    from tlq_hf.calibration import layer_loop
    from tlq_hf.calibration.importance import TokenWeighting

    groups_seen: list[list[str]] = []
    real_groups = layer_loop.LayerLoop._groups

    def spy(self, modules, run_one, calls):
        out = real_groups(self, modules, run_one, calls)
        groups_seen.extend(g.members for g in out)
        return out

    monkeypatch.setattr(layer_loop.LayerLoop, "_groups", spy)
    cfg = TLQConfig(method="tlq", dataset=sample_rows(4), num_samples=4)
    shared = auto_class().from_pretrained(moe_vlm, quantization_config=cfg).state_dict()
    experts = [g for g in groups_seen if ".experts." in g[0]]
    assert experts and all(len(g) == 2 and g[0].endswith("gate_proj") for g in experts if "down_proj" not in g[0])
    assert all(len(g) == 1 for g in groups_seen if ".self_attn." in g[0])  # q, k, v: one output gradient each
    monkeypatch.setattr(TokenWeighting, "partition", lambda self, names: [[n] for n in names])
    separate = auto_class().from_pretrained(moe_vlm, quantization_config=cfg).state_dict()
    assert shared.keys() == separate.keys()
    assert all(torch.equal(shared[k], separate[k]) for k in shared)


def test_disk_offloaded_experts_are_read_one_expert_at_a_time_and_give_the_in_memory_checkpoint(
    moe_vlm, tmp_path, batch_for
):
    """Decoder layers on disk: each expert's projections load from the fused tensors' offloaded copy one expert at
    a time (never a whole fused tensor), calibrated layers go back to disk packed, and the saved checkpoint is the
    in-memory run's, byte for byte."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from tlq_hf.arch import decoder_device_map
    from tlq_hf.calibration import offload

    cfg = TLQConfig(method="tlq", dataset=sample_rows(4), num_samples=4)
    reference = auto_class().from_pretrained(moe_vlm, quantization_config=cfg)
    reference.save_pretrained(tmp_path / "reference")
    with init_empty_weights():
        device_map = decoder_device_map(auto_class().from_config(reference.config))
    rows: list[int] = []
    real_reader = offload.row_reader

    def counting_reader(module, name="weight"):
        read = real_reader(module, name)
        return lambda lo, hi: (rows.append(hi - lo), read(lo, hi))[1]

    storages: list[int] = []
    real_getitem = offload.ExpertSlices.__getitem__

    def getitem_spy(self, key):
        out = real_getitem(self, key)
        storages.append(out.untyped_storage().nbytes())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offload, "row_reader", counting_reader)
        mp.setattr(offload.ExpertSlices, "__getitem__", getitem_spy)
        model = auto_class().from_pretrained(
            moe_vlm, device_map=device_map, offload_folder=str(tmp_path / "weights"), quantization_config=cfg
        )
    assert rows and set(rows) == {1}  # one expert per read
    fused_bytes = reference.config.text_config.moe_intermediate_size * 2 * reference.config.text_config.hidden_size * 4
    assert storages and max(storages) <= fused_bytes  # copies of one expert, not views of the mapped file
    experts = model.get_submodule("model.language_model.layers.1.mlp.experts")
    assert isinstance(experts, UnfusedExperts) and isinstance(experts.expert(3).down_proj, TLQLinear)
    assert {t.device.type for t in experts.state_dict().values()} == {"meta"}  # packed, back on disk
    assert len(list((tmp_path / "weights" / "tlq-packed").glob("*.safetensors"))) == 2
    layer = model.tlq_report.layers[0]
    assert layer.phases["experts_forward"] > 0 and layer.phases["experts_solve"] > 0
    assert layer.phases["experts_solve"] <= layer.phases["solve"]
    batch = batch_for("qwen3_vl_moe")
    torch.testing.assert_close(logits_of(model, batch), logits_of(reference, batch), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "offloaded")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("reference", "offloaded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offloaded_experts_without_a_source_are_refused_by_name():
    model = _build("qwen3_5_moe")
    experts = next(n for n, m in model.named_modules() if type(m).__name__.endswith("Experts"))
    module = model.get_submodule(experts)
    module.to_empty(device="meta")
    with pytest.raises(ValueError, match=re.escape(experts) + ".*offloaded.*device_map='cpu'"):
        unfuse_experts(model, "", lambda n, m: swap_module(model, n, m))


def test_statistics_in_several_passes_run_only_their_experts_and_give_the_same_codes(moe_vlm, monkeypatch):
    """With a statistics budget below one MoE layer's statistics, experts are collected a few at a time; a pass after
    the first runs only its own experts (its output is discarded), and the codes equal the one-pass run's."""
    import functools

    from tlq_hf.calibration import layer_loop, pipeline

    cfg = TLQConfig(method="gptq", dataset=sample_rows(4), num_samples=4)
    one_pass = auto_class().from_pretrained(moe_vlm, quantization_config=cfg).state_dict()
    plans, skipped = [], []
    real_passes, real_skips = layer_loop.statistic_passes, UnfusedExperts.skips

    def passes_spy(groups, footprint, budget, bin_of=None):
        out = real_passes(groups, footprint, budget, bin_of)
        plans.append([{bin_of(groups[k]) for k in p} for p in out])
        return out

    def skips_spy(self, e):
        out = real_skips(self, e)
        skipped.append(out)
        return out

    monkeypatch.setattr(pipeline, "LayerSettings", functools.partial(layer_loop.LayerSettings, statistics_budget=0))
    monkeypatch.setattr(layer_loop, "statistic_passes", passes_spy)
    monkeypatch.setattr(UnfusedExperts, "skips", skips_spy)
    passes = auto_class().from_pretrained(moe_vlm, quantization_config=cfg).state_dict()
    assert plans and all(len(p) > 2 for p in plans)
    assert all(len(bins) == 1 for plan in plans for bins in plan)  # experts and other modules never share a pass
    assert any(skipped) and not all(skipped)
    assert all(torch.equal(one_pass[k], passes[k]) for k in one_pass)


def test_round_to_nearest_onloads_all_experts_of_a_disk_offloaded_layer_once(moe_vlm, tmp_path):
    """RTN (no calibration data) rounds a layer's experts together, from their stored dtype, and writes them back to
    disk in one packed file (not one per expert); the checkpoint is the in-memory run's."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from tlq_hf.arch import decoder_device_map

    cfg = TLQConfig(method="rtn")
    auto_class().from_pretrained(moe_vlm, quantization_config=cfg).save_pretrained(tmp_path / "reference")
    with init_empty_weights():
        device_map = decoder_device_map(auto_class().from_config(transformers.AutoConfig.from_pretrained(moe_vlm)))
    model = auto_class().from_pretrained(
        moe_vlm, device_map=device_map, offload_folder=str(tmp_path / "weights"), quantization_config=cfg
    )
    assert len(list((tmp_path / "weights" / "tlq-packed").glob("*.safetensors"))) == 2 * 2  # experts, attention
    model.save_pretrained(tmp_path / "offloaded")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("reference", "offloaded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", ["NVFP4A16", "MXFP4A16", "FP8_DYNAMIC"])
def test_float_experts_are_refused_for_compressed_tensors_and_round_trip_natively(preset, tmp_path):
    """transformers 5 merges per-expert FP4 tensors into fused experts whose logits are wrong, without an error
    (FP8 ``weight`` tensors it cannot merge at all): refused before any change for compressed-tensors; the native
    format keeps the float codes packed and reloads to the in-memory logits."""
    _build("qwen3_5_moe").to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="save_format='tlq'"):
        auto_class().from_pretrained(tmp_path / "fp", quantization_config=TLQConfig(scheme=preset, method="rtn"))
    config = TLQConfig(scheme=preset, method="rtn", save_format="tlq")
    model = auto_class().from_pretrained(tmp_path / "fp", quantization_config=config, dtype=torch.bfloat16)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "q")
    reloaded = auto_class().from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)
