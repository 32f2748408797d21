"""Solvers: pure functions from a weight (and calibration statistics) to integer codes and qparams.

A solver never packs and never touches modules; token weights, where a solver uses them, are an
explicit argument.
"""

from .rtn import rtn

__all__ = ["rtn"]
