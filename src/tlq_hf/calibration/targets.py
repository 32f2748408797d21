"""Where a layer's full-precision output ``Y_fp`` (the calibration target) comes from.

- **streamed**: the gradient pass kept the full-precision boundaries ``X[0..L]``; layer ``l``'s target is
  ``X[l + 1]``, read, never computed;
- **recomputed**: the full-precision layer runs on ``X_fp`` before the statistics (exposed inputs);
- **paired**: a paired statistic (GPTAQ's cross term) runs the full-precision layer on ``X_fp`` for every sample
  anyway: the first statistics pass keeps those outputs;
- **same pass**: inputs are not exposed (``X_in`` is ``X_fp``): the first statistics pass's outputs are the targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .activations import ActivationStore

__all__ = ["FullPrecisionTargets"]


class FullPrecisionTargets:
    """The target store of one layer and which of the four sources fills it (see the module docstring)."""

    def __init__(self, store: ActivationStore, source: str, dtype: torch.dtype) -> None:
        self.store, self.source, self.dtype = store, source, dtype

    @classmethod
    def for_layer(
        cls,
        index: int,
        boundaries: list[ActivationStore] | None,
        exposed: bool,
        paired: bool,
        spill_dir: str | None,
        dtype: torch.dtype,
    ) -> FullPrecisionTargets:
        """The source for layer ``index``: streamed when the gradient pass kept ``boundaries``, else by how the
        statistics run."""
        if boundaries is not None:
            return cls(boundaries[index + 1], "streamed", dtype)
        store = ActivationStore(spill_dir, "x_fp")
        if not exposed:
            return cls(store, "same pass", dtype)
        return cls(store, "paired" if paired else "recomputed", dtype)

    def before_statistics(self, forward: Callable[[torch.Tensor, int], torch.Tensor], x_fp: ActivationStore) -> None:
        """Recomputed targets: the full-precision layer on every full-precision input."""
        if self.source == "recomputed":
            for j, x in enumerate(x_fp):
                self.store.append(forward(x, j).to(self.dtype))

    def from_reference(self, y: torch.Tensor) -> None:
        """A full-precision output the paired statistics computed (first pass, in sample order)."""
        if self.source == "paired":
            self.store.append(y.to(self.dtype))

    def from_statistics(self, y: torch.Tensor) -> None:
        """An output of the first statistics pass (in sample order): the target when inputs are not exposed."""
        if self.source == "same pass":
            self.store.append(y.to(self.dtype))
