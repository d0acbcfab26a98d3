"""Datasets found by name: built-in ones registered here, ``tfds/<name>`` served by the TFDS layer.

A dataset is a ``DatasetInfo`` (classes, channels, native size, normalisation and augmentation
defaults) plus map-style splits whose items are ``(PIL.Image, label)``. Everything downstream
(transforms, sharded loaders, the train loop) depends only on this interface.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

TFDS_PREFIX = "tfds/"


@dataclass(frozen=True)
class DatasetInfo:
    """What the model, the transforms and the loaders need to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    default_val_split: str = "validation"
    # Augmentation defaults: timm's ImageNet ones unless a dataset needs gentler ones.
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875


class DatasetSource(Protocol):
    """A family of splits: what ``register_dataset`` and the TFDS layer provide."""

    def info(self, data_dir: str | None, **hints: Any) -> DatasetInfo: ...

    def split(self, split: str, data_dir: str | None, **hints: Any) -> Sequence[tuple[Any, Any]]: ...


_SOURCES: dict[str, Callable[[], DatasetSource]] = {}


def register_dataset(name: str) -> Callable[[Callable[[], DatasetSource]], Callable[[], DatasetSource]]:
    """Register a zero-argument factory of a ``DatasetSource`` under ``name``."""

    def deco(factory: Callable[[], DatasetSource]) -> Callable[[], DatasetSource]:
        if name in _SOURCES:
            raise ValueError(f"dataset {name!r} is registered twice")
        _SOURCES[name] = factory
        return factory

    return deco


def dataset_names() -> list[str]:
    _load_builtins()
    return sorted(_SOURCES)


def is_known_dataset(name: str) -> bool:
    """True for registered names and any ``tfds/<name>`` (whether it is prepared is checked later)."""
    _load_builtins()
    return name in _SOURCES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX))


def get_source(name: str) -> DatasetSource:
    _load_builtins()
    if name in _SOURCES:
        return _SOURCES[name]()
    if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
        from pf_sweep.data.tfds_source import TfdsSource

        return TfdsSource(name[len(TFDS_PREFIX) :])
    raise ValueError(f"Invalid dataset: {name!r} (allowed: {', '.join(sorted(_SOURCES))}, tfds/<name>)")


def _load_builtins() -> None:
    if not _SOURCES:
        import pf_sweep.data.builtin  # noqa: F401 - registers on import


_SPLIT_RE = re.compile(r"^(?P<base>[\w\-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """``"train[10%:]"`` -> ("train", "10%", None): TFDS slicing syntax for the built-in datasets."""
    match = _SPLIT_RE.match(spec.strip())
    if match is None:
        raise ValueError(f"Invalid split: {spec!r} (expected NAME or NAME[start:stop], e.g. train[:80%])")
    return match["base"], match["start"], match["stop"]


def slice_indices(n: int, start: str | None, stop: str | None) -> range:
    """Indices ``[start:stop]`` of ``n`` items, where bounds are counts or percentages (TFDS rules)."""

    def bound(b: str | None, default: int) -> int:
        if b is None:
            return default
        value = int(b.rstrip("%"))
        if b.endswith("%"):
            value = round(n * value / 100)
        return value + n if value < 0 else min(value, n)

    return range(*slice(bound(start, 0), bound(stop, n)).indices(n))
