"""Datasets by name (built-in and ``tfds/<name>``), timm transforms, sharded per-worker loaders."""

from pf_sweep.data.loader import ShardedSampler, TransformedSplit, build_loader
from pf_sweep.data.registry import DatasetInfo, dataset_names, get_source, is_known_dataset, register_dataset
from pf_sweep.data.transforms import build_transform, resolved_options

__all__ = [
    "DatasetInfo",
    "ShardedSampler",
    "TransformedSplit",
    "build_loader",
    "build_transform",
    "dataset_names",
    "get_source",
    "is_known_dataset",
    "register_dataset",
    "resolved_options",
]
