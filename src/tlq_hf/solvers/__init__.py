"""Solvers: pure functions from a weight (and calibration statistics) to integer codes and qparams.

A solver never packs and never touches modules; token weights, where a solver uses them, are an
explicit argument. Each module registers its layer-loop adapter (:data:`LAYER_SOLVERS`, :data:`SMOOTHERS`) next
to its algorithm; importing this package registers them all.
"""

from .awq import awq_clip_search, awq_scale_search, weighted_output_error
from .gptaq import asymmetric_map, asymmetric_weights
from .gptq import GPTQFactor, gptq, gptq_factor, gptq_quantize, weighted_hessian
from .registry import LAYER_SOLVERS, SMOOTHERS, LayerSolver, Smoother, Solution, layer_solver, smoother
from .rtn import rtn, solve_rtn
from .smoothquant import smoothquant_scales

__all__ = [
    "LAYER_SOLVERS",
    "SMOOTHERS",
    "LayerSolver",
    "Smoother",
    "Solution",
    "layer_solver",
    "smoother",
    "solve_rtn",
    "asymmetric_map",
    "asymmetric_weights",
    "awq_clip_search",
    "awq_scale_search",
    "GPTQFactor",
    "gptq",
    "gptq_factor",
    "gptq_quantize",
    "rtn",
    "smoothquant_scales",
    "weighted_hessian",
    "weighted_output_error",
]
