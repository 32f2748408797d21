"""The package's structure: one registry per concept is the one vocabulary (config, command line, report read it),
a new solver / format / kernel is one decorated class or function, and no runtime module imports the test fixtures."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch
from _helpers import auto_class

from tlq_hf import TLQConfig
from tlq_hf.calibration.importance_kinds import IMPORTANCE_KINDS
from tlq_hf.calibration.pipeline import QuantizationReport
from tlq_hf.cli import _add_quant_args, _config
from tlq_hf.config import CHOICES
from tlq_hf.formats import FORMATS, CheckpointFormat, NativeFormat
from tlq_hf.formats.card import model_card
from tlq_hf.methods import METHODS, resolve_recipe
from tlq_hf.nn import TLQLinear, kernels
from tlq_hf.registry import Registry
from tlq_hf.solvers import LAYER_SOLVERS, layer_solver, solve_rtn
from tlq_hf.testing.tiny_models import sample_rows

SRC = Path(__file__).resolve().parents[1] / "src" / "tlq_hf"

#: config field -> its registry
REGISTRIES = {
    "method": METHODS,
    "solver": LAYER_SOLVERS,
    "importance": IMPORTANCE_KINDS,
    "save_format": FORMATS,
}


def _parse(argv: list[str]) -> TLQConfig:
    p = argparse.ArgumentParser()
    _add_quant_args(p)
    return _config(p.parse_args(argv))


def _report(config: TLQConfig) -> dict:
    """What the command line's ``--report`` holds about the run's vocabulary (method, recipe, format)."""
    report = QuantizationReport(config.method, config.scheme.name, recipe=resolve_recipe(config))
    return report.as_dict() | {"format": config.save_format}


@pytest.mark.parametrize("field", list(REGISTRIES))
def test_every_registered_name_round_trips_through_config_cli_and_report(field):
    registry = REGISTRIES[field]
    assert len(registry) >= 2 and set(registry) <= set(CHOICES[field])
    for name in registry:
        config = TLQConfig(**{field: name})
        assert getattr(TLQConfig.from_dict(config.to_dict()), field) == name
        assert getattr(_parse([f"--{field.replace('_', '-')}", name]), field) == name
        report = _report(config)
        seen = {
            "method": report["method"],
            "solver": report["recipe"]["solver"],
            "importance": report["recipe"]["importance"],
            "save_format": report["format"],
        }[field]
        assert seen == name, (field, name, report)


def test_a_name_outside_a_registry_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"TLQConfig\(solver='nope'\): use one of \(None, .*'gptq'"):
        TLQConfig(solver="nope")
    with pytest.raises(KeyError, match="unknown solver 'nope': registered are"):
        LAYER_SOLVERS["nope"]
    registry: Registry = Registry("thing")
    registry.register(type("A", (), {"name": "a"}))
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        registry.register(type("B", (), {"name": "a"}))


@pytest.fixture
def toy_solver():
    """A new solver is one decorated function: here, round-to-nearest that counts its calls."""
    calls = []

    @layer_solver("toy-rtn", needs=("hessian",))
    def solve_toy(weights, group, scheme, cfg, scale_dtype):
        calls.append(group.stats["hessian"].mass)
        return solve_rtn(weights, group, scheme, cfg, scale_dtype)

    yield calls
    LAYER_SOLVERS.unregister("toy-rtn")


def test_a_solver_registered_later_is_accepted_by_config_and_cli_and_runs(toy_solver, tiny_vlm_dirs):
    assert _parse(["--solver", "toy-rtn"]).solver == "toy-rtn"
    config = TLQConfig(method="gptq", solver="toy-rtn", dataset=sample_rows(4), num_samples=4)
    model = auto_class().from_pretrained(tiny_vlm_dirs["qwen2_vl"], quantization_config=config, dtype=torch.float32)
    packed = sum(isinstance(m, TLQLinear) for m in model.modules())
    # one call per group of linears sharing an input (q/k/v, gate/up share one with uniform weights)
    assert packed == 14 and len(toy_solver) == 8 and all(mass > 0 for mass in toy_solver)
    assert model.tlq_report.recipe.solver == "toy-rtn"


@pytest.fixture
def toy_format():
    """A new format is one decorated class: here, the native format's tensors under another name and card."""

    @FORMATS.register
    class ToyFormat(CheckpointFormat):
        name = "toy"
        quant_method = "toy"
        tag = "toy-format"
        needs_plugin = True

        def scheme_of(self, quantization_config):
            return NativeFormat().scheme_of(quantization_config)

        def module_tensors(self, scheme, shape):
            return NativeFormat().module_tensors(scheme, shape)

        def usage(self, name, scheme):
            return [f"toy loader for {name}"]

    yield ToyFormat
    FORMATS.unregister("toy")


def test_a_format_registered_later_is_accepted_and_asked_by_the_card(toy_format, tiny_vlm_dirs):
    assert _parse(["--save-format", "toy"]).save_format == "toy"
    config = TLQConfig(method="rtn", save_format="toy")
    model = auto_class().from_pretrained(tiny_vlm_dirs["qwen2_vl"], quantization_config=config, dtype=torch.float32)
    card = str(model_card(model, repo_id="me/toy"))
    assert "toy-format" in card and "toy loader for me/toy" in card and "| format | toy |" in card
    with pytest.raises(TypeError, match="'toy'.* defines prepare_load and check_loaded"):  # no loader hooks written
        toy_format().prepare_load(model, config, torch.float32, [])


@pytest.fixture
def toy_kernel():
    """A new kernel is one decorated class; it is tried before those registered after it."""

    class ToyDequant:
        name = "toy-dequant"

        def unsupported(self, module):
            return None if module.scheme.bits == 4 else "toy: 4-bit only"

        def prepare(self, module, codes):
            return codes

        def forward(self, module, x):
            return x @ module.dequantized_weight(x.dtype).T

        def codes(self, module):
            return module._kernel_state

    registry = Registry("kernel", instantiate=True)
    registry.register(ToyDequant)
    for kernel in kernels.KERNELS.values():
        registry.register(kernel)
    return registry


def test_a_kernel_registered_first_is_selected_where_it_runs(toy_kernel, monkeypatch):
    from tlq_hf.primitives import quantize_weight
    from tlq_hf.qtypes import QuantScheme

    monkeypatch.setattr(kernels, "KERNELS", toy_kernel)
    scheme = QuantScheme(bits=4, group_size=32)
    codes, qp = quantize_weight(torch.randn(16, 64), scheme, scale_dtype=torch.float32)
    module = TLQLinear.from_codes(codes, qp, scheme)
    assert kernels.select_kernel(module).name == "toy-dequant"
    three = QuantScheme(bits=3, group_size=32)
    codes3, qp3 = quantize_weight(torch.randn(16, 64), three, scale_dtype=torch.float32)
    assert kernels.select_kernel(TLQLinear.from_codes(codes3, qp3, three)) is None  # fp32: no built-in runs it


def _imports(path: Path) -> list[str]:
    """Every module name ``path`` imports, relative imports resolved against the package."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            names.append(prefix)
            names += [f"{prefix}.{a.name}" for a in node.names]
    return names


def test_no_runtime_module_imports_the_testing_subpackage():
    offenders = [
        f"{path.relative_to(SRC)}: {name}"
        for path in sorted(SRC.rglob("*.py"))
        if "testing" not in path.relative_to(SRC).parts
        for name in _imports(path)
        if name == "tlq_hf.testing" or name.startswith("tlq_hf.testing.")
    ]
    assert not offenders, offenders
    # the check sees relative imports: the testing package's own modules do import the runtime
    assert "tlq_hf.arch.load_auto_class" in _imports(SRC / "testing" / "tiny_models.py")
