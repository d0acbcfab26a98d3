"""timm transforms resolved from a ``TrialConfig`` and a dataset's defaults.

Training: random-resized-crop (``scale``, ``ratio``), horizontal flip, normalisation; evaluation:
resize + center crop by ``crop_pct``. Colour jitter, auto-augment and random erasing stay off: the
paper's SAM recipes use the plain Inception-style crop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.data import create_transform

from pf_sweep.config import TrialConfig
from pf_sweep.data.registry import DatasetInfo


def resolved_options(cfg: TrialConfig, info: DatasetInfo) -> dict[str, Any]:
    """Every augmentation knob, with the dataset's default wherever the config says None."""
    size = cfg.img_size or info.image_size
    return {
        "input_size": (info.in_chans, size, size),
        "scale": cfg.scale or info.scale,
        "ratio": cfg.ratio or info.ratio,
        "hflip": info.hflip if cfg.hflip is None else cfg.hflip,
        "crop_pct": cfg.crop_pct or info.crop_pct,
        "mean": cfg.mean or info.mean,
        "std": cfg.std or info.std,
        "interpolation": cfg.interpolation,
        "eval_interpolation": cfg.eval_interpolation or ("bilinear" if cfg.interpolation == "random" else cfg.interpolation),
    }


def build_transform(cfg: TrialConfig, info: DatasetInfo, training: bool) -> Callable:
    opts = resolved_options(cfg, info)
    if len(opts["mean"]) != info.in_chans:
        raise ValueError(f"Invalid mean/std: {len(opts['mean'])} channels, but {info.name} has {info.in_chans}")
    if training and cfg.augment:
        return create_transform(
            opts["input_size"],
            is_training=True,
            scale=opts["scale"],
            ratio=opts["ratio"],
            hflip=opts["hflip"],
            color_jitter=None,
            interpolation=opts["interpolation"],
            mean=opts["mean"],
            std=opts["std"],
        )
    return create_transform(
        opts["input_size"],
        is_training=False,
        interpolation=opts["eval_interpolation"],
        crop_pct=opts["crop_pct"],
        mean=opts["mean"],
        std=opts["std"],
    )
