"""Importance kinds: how a token's raw importance is read off the gradient at a module's output.

``TLQConfig(importance=...)`` accepts exactly the names registered in :data:`IMPORTANCE_KINDS`. A kind without a
``reduce`` needs no gradient pass (every token weighs the same); a ``per_modality`` kind replaces each token's
weight by the mean of its modality (vision or text) in its layer (MBQ-style balancing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry

__all__ = ["IMPORTANCE_KINDS", "ImportanceKind"]


@dataclass(frozen=True)
class ImportanceKind:
    """One way to weigh tokens: ``reduce`` maps the output gradient ``[..., T, out]`` to raw importance
    ``[..., T]`` (``None``: no gradient, uniform weights); ``per_modality``: weights are per-modality means."""

    name: str
    reduce: Callable[[torch.Tensor], torch.Tensor] | None
    per_modality: bool = False

    @property
    def from_gradient(self) -> bool:
        """Whether the kind needs the block-wise gradient pass."""
        return self.reduce is not None


def squared_norm(g: torch.Tensor) -> torch.Tensor:
    """``sum_j g_j^2``: a diagonal-Fisher estimate of how much an output error at the token raises the loss."""
    return g.float().pow(2).sum(-1)


def absolute_sum(g: torch.Tensor) -> torch.Tensor:
    """``sum_j |g_j|``."""
    return g.float().abs().sum(-1)


IMPORTANCE_KINDS: Registry[ImportanceKind] = Registry("importance kind")
IMPORTANCE_KINDS.register(ImportanceKind("fisher", squared_norm))
IMPORTANCE_KINDS.register(ImportanceKind("l1", absolute_sum))
IMPORTANCE_KINDS.register(ImportanceKind("uniform", None))
# per-token Fisher, averaged per modality (MBQ)
IMPORTANCE_KINDS.register(ImportanceKind("modality", squared_norm, per_modality=True))
