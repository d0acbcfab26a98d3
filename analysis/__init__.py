"""Measure finished sweeps: load their results, sharpness (Hessian, m-sharpness), forgetting, and
the correlation of each with generalization.

    from analysis import load_sweep, load_history              # pandas DataFrames
    from analysis import hessian, sharpness, forgetting, correlation
    from analysis import tables, plots, measure                 # paper tables, figures, a whole sweep on Ray

Every measure is a plain function of ``(model, loss_fn, data)`` returning numbers, and every table
a tidy DataFrame. Submodules load on first use, so ``import analysis`` stays cheap (no torch until a
measure needs it). ``pf_sweep`` never imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("results", "checkpoints", "hessian", "sharpness", "forgetting", "correlation", "tables", "plots", "measure")
_FROM_RESULTS = ("load_sweep", "load_history")

__all__ = [*_SUBMODULES, *_FROM_RESULTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"analysis.{name}")
    if name in _FROM_RESULTS:
        return getattr(importlib.import_module("analysis.results"), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
