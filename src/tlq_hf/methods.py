"""Calibration methods: what each turns on in the one pipeline (token importance, solver, smoothing, exposed inputs).

A method is a :class:`Method` registered in :data:`METHODS`; ``TLQConfig(method=...)`` and ``tlq-quantize
--method`` accept exactly the registered names. Explicit config fields (``importance``, ``solver``, ``exposed``)
override a method's recipe (:func:`resolve_recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry
from .solvers import SMOOTHERS

__all__ = ["METHODS", "Method", "Recipe", "resolve_recipe"]


@dataclass(frozen=True)
class Recipe:
    """What a run turns on: token importance, solver, smoothing, exposed inputs."""

    importance: str | None  # None: no token weights at all
    solver: str
    smoothing: str | None
    exposed: bool


@dataclass(frozen=True)
class Method:
    """A named recipe. With ``smoothing_follows_solver`` a solver chosen in the config brings its own smoothing
    where it has one (TLQ with ``solver="awq"`` folds AWQ scales; with GPTQ, none)."""

    name: str
    recipe: Recipe
    smoothing_follows_solver: bool = False

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration data at all (round-to-nearest does not)."""
        r = self.recipe
        return not (r.importance is None and r.solver == "rtn" and r.smoothing is None)


METHODS: Registry[Method] = Registry("method")
METHODS.register(Method("tlq", Recipe("fisher", "gptq", None, True), smoothing_follows_solver=True))
# as GPTQ tools do: sequential, quantized inputs
METHODS.register(Method("gptq", Recipe("uniform", "gptq", None, True)))
# asymmetric GPTQ: the full-precision output as the target of the exposed input
METHODS.register(Method("gptaq", Recipe("uniform", "gptaq", None, True)))
METHODS.register(Method("awq", Recipe("uniform", "awq", "awq", False)))
# modality-balanced token weights with the AWQ solver
METHODS.register(Method("mbq", Recipe("modality", "awq", "awq", False)))
METHODS.register(Method("smoothquant", Recipe(None, "rtn", "smoothquant", False)))
METHODS.register(Method("rtn", Recipe(None, "rtn", None, False)))


def resolve_recipe(config) -> Recipe:
    """The method's recipe with the config's explicit overrides (``solver``, ``importance``, ``exposed``) applied."""
    method = METHODS[config.method]
    base = method.recipe
    solver = config.solver or base.solver
    smoothing = base.smoothing
    if method.smoothing_follows_solver:
        smoothing = solver if solver in SMOOTHERS else None
    importance = config.importance if config.importance is not None else base.importance
    exposed = base.exposed if config.exposed is None else config.exposed
    return Recipe(importance, solver, smoothing, exposed)
