"""Putting packed modules in place of a layer's linears, through the run's journal of edits.

While a later statistics pass of the layer still runs its full-precision linears, packed modules wait
(``defer``); otherwise they go in at once and the replaced linears' onloaded copies are released, so a layer never
holds both forms of more than the group being installed.
"""

from __future__ import annotations

from torch import nn

from .journal import ModelEdits
from .offload import Onloaded

__all__ = ["Installer"]


class Installer:
    """Swaps packed modules into one onloaded layer (``live``: in-model name -> the linear it replaces)."""

    def __init__(self, edits: ModelEdits, live: dict[str, nn.Module], on: Onloaded) -> None:
        self.edits, self.live, self.on = edits, live, on
        self.waiting: dict[str, nn.Module] = {}

    def defer(self, packed: dict[str, nn.Module]) -> None:
        """Keep ``packed`` until :meth:`flush` (a later pass still needs the full-precision linears)."""
        self.waiting.update(packed)

    def install(self, packed: dict[str, nn.Module]) -> None:
        """Swap ``packed`` in now and release the replaced linears' onloaded copies."""
        for name, module in packed.items():
            self.edits.swap(name, module)
            self.on.release(self.live[name])

    def flush(self) -> None:
        """Install everything deferred."""
        self.install(self.waiting)
        self.waiting = {}
