"""What a run quantizes of the language-model decoder, and what it keeps in full precision and why.

Nothing in the decoder stays float silently: every decoder weight matrix (a parameter of two or more
dimensions) is either quantized or kept by a named rule (:func:`~tlq_hf.arch.kept_by_role`: routers, scalar
gates, linears with their own forward; ``ignore=``; convolutions and embeddings, which no scheme here
covers). Anything else, e.g. fused experts of a convention tlq_hf does not know, raises
:class:`UnquantizedWeightError` naming it and the fix, before any weight changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .arch import find_decoder_stack, kept_by_role, matches_any

__all__ = ["Coverage", "UnquantizedWeightError", "decoder_coverage"]

_OTHER_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "convolution"),
    (nn.Conv2d, "convolution"),
    (nn.Embedding, "embedding"),
)


class UnquantizedWeightError(ValueError):
    """A decoder weight matrix would stay in full precision without a rule saying so."""


@dataclass
class Coverage:
    """Decoder weight-matrix parameters: quantized, and kept by reason (parameter counts)."""

    quantized: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    kept_modules: dict[str, str] = field(default_factory=dict)  # module name -> reason

    @property
    def total(self) -> int:
        return self.quantized + sum(self.kept.values())

    def summary(self) -> str:
        """E.g. ``decoder weights 97.9% quantized (1.52M of 1.55M parameters); kept: router 2.0K (2 modules)``."""
        line = f"decoder weights {self.quantized / max(self.total, 1):.1%} quantized ({_n(self.quantized)} of "
        line += f"{_n(self.total)} parameters)"
        if self.kept:
            modules: dict[str, int] = {}
            for reason in self.kept_modules.values():
                modules[reason] = modules.get(reason, 0) + 1
            kept = ", ".join(f"{r} {_n(n)} ({modules.get(r, 0)} modules)" for r, n in sorted(self.kept.items()))
            line += f"; kept in full precision: {kept}"
        return line


def _n(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def decoder_coverage(model: nn.Module, targets: dict[str, nn.Module], ignore: list[str] | None) -> Coverage:
    """The coverage a run quantizing ``targets`` (linears, by name) will reach in ``model``'s decoder.

    Raises :class:`UnquantizedWeightError` naming every decoder weight matrix that is neither a target nor kept
    by a rule.
    """
    stack = find_decoder_stack(model)
    roles = kept_by_role(model)
    cov = Coverage()
    unexplained: list[str] = []
    for rel, module in stack.layers.named_modules():
        name = f"{stack.path}.{rel}"
        if name in targets:
            cov.quantized += module.weight.numel()
            continue
        own = [(p_name, p) for p_name, p in module.named_parameters(recurse=False) if p.ndim >= 2]
        if not own:
            continue
        reason = roles.get(name)
        if reason is None and ignore is not None and matches_any(name, ignore):
            reason = "ignore="
        if reason is None:
            reason = next((r for cls, r in _OTHER_KINDS if isinstance(module, cls)), None)
        if reason is None:
            unexplained += [f"{name}.{p_name} {tuple(p.shape)} ({type(module).__name__})" for p_name, p in own]
            continue
        cov.kept[reason] = cov.kept.get(reason, 0) + sum(p.numel() for _, p in own)
        cov.kept_modules[name] = reason
    if unexplained:
        example = re.escape(unexplained[0].split(" ")[0].rpartition(".")[0])
        raise UnquantizedWeightError(
            f"{len(unexplained)} decoder weight matrices would stay in full precision with no rule saying so: "
            f"{'; '.join(unexplained[:6])}{' ...' if len(unexplained) > 6 else ''}. tlq_hf quantizes nn.Linear "
            "layers and fused experts of transformers' experts interface (and Llama 4's); these are neither. To "
            "keep them in full precision on purpose, list them in TLQConfig(ignore=[...]) together with what "
            f"else stays float (with ignore set, every other linear is quantized), e.g. "
            f"ignore=['re:.*visual.*', 're:.*vision.*', 're:.*projector.*', 're:.*lm_head', 're:{example}']."
        )
    return cov
