"""Datasets by name (built-in and ``tfds/<name>``), timm transforms, sharded per-worker loaders.

The loader and transform names load lazily: ``python -m pf_sweep.data prepare`` imports TensorFlow,
and must not pull torch and timm into that process as well (nor pay their 2 s import).
"""

from __future__ import annotations

import importlib
from typing import Any

from pf_sweep.data.registry import DatasetInfo, dataset_names, get_source, is_known_dataset, register_dataset

_LAZY = {
    "ShardedSampler": "pf_sweep.data.loader",
    "TransformedSplit": "pf_sweep.data.loader",
    "build_loader": "pf_sweep.data.loader",
    "build_transform": "pf_sweep.data.transforms",
    "resolved_options": "pf_sweep.data.transforms",
}

__all__ = ["DatasetInfo", "dataset_names", "get_source", "is_known_dataset", "register_dataset", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pf_sweep.data' has no attribute {name!r}")
