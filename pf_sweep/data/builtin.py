"""Built-in datasets that need no download: real handwritten digits, a spurious-cue variant, synthetic.

``digits`` is scikit-learn's bundled copy of the UCI handwritten digits (1,797 real 8x8 grayscale
images, 10 classes), split once into a fixed 80/20 train/validation partition.

``digits_spurious`` adds a model bias to learn and forget: one bright border pixel whose position
encodes the class in 90% of training images (random otherwise). In ``validation`` the pixel's
position is random, in ``validation_aligned`` it always matches the class, so the gap between the two
measures how much a model relies on the cue.

``synthetic`` is random images of any size and class count for benchmarks (``img_size`` and
``num_classes`` from the config), generated per index so it costs no memory.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pf_sweep.data.registry import DatasetInfo, parse_split, register_dataset, slice_indices

DIGITS_SPLIT_SEED = 20240615
SPURIOUS_SEED = 7
SPURIOUS_TRAIN_ALIGNMENT = 0.9
# One pixel per class: the ten pixels (all in the outer columns) that are ink in at most 1.2% of
# scikit-learn's digits, so the cue is salient and the digit itself almost never mimics it.
CUE_PIXELS = ((0, 0), (4, 0), (4, 7), (7, 0), (3, 0), (6, 0), (2, 0), (3, 7), (1, 0), (5, 7))


class ArraySplit(Sequence):
    """uint8 images (N, H, W) + int labels, served as ``(PIL.Image, int)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:  # type: ignore[override]
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def _select(split: ArraySplit, start: str | None, stop: str | None) -> ArraySplit:
    idx = np.asarray(slice_indices(len(split), start, stop), dtype=np.int64)
    return ArraySplit(split.images[idx], split.labels[idx])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (N, 8, 8) with values 0..16, and int64 labels.

    Read straight from the CSV scikit-learn ships (what ``load_digits`` parses), without importing
    scikit-learn: its import takes about a second, paid by every trial process that loads digits.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    if spec is not None and spec.submodule_search_locations:
        csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another layout: let scikit-learn find its file

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


@functools.cache
def _digits_partition() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pixels, labels = _digits_arrays()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_train = int(0.8 * len(labels))
    return {
        "train": (images[order[:n_train]], labels[order[:n_train]]),
        "validation": (images[order[n_train:]], labels[order[n_train:]]),
    }


def _with_cue(images: np.ndarray, labels: np.ndarray, aligned_prob: float, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    aligned = rng.random_sample(len(labels)) < aligned_prob
    positions = np.where(aligned, labels, rng.randint(0, len(CUE_PIXELS), len(labels)))
    out = images.copy()
    for i, pos in enumerate(positions):
        r, c = CUE_PIXELS[pos]
        out[i, r, c] = 255
    return out


class _DigitsSource:
    spurious = False

    def info(self, data_dir: str | None, **hints: Any) -> DatasetInfo:
        splits = ("train", "validation", "validation_aligned") if self.spurious else ("train", "validation")
        return DatasetInfo(
            name="digits_spurious" if self.spurious else "digits",
            num_classes=10,
            in_chans=1,
            image_size=8,
            mean=(0.5,),
            std=(0.5,),
            splits=splits,
            scale=(0.85, 1.0),
            ratio=(0.9, 1.1),
            hflip=0.0,  # digits are not mirror-symmetric
            crop_pct=1.0,
        )

    def split(self, split: str, data_dir: str | None, **hints: Any) -> ArraySplit:
        base, start, stop = parse_split(split)
        allowed = self.info(data_dir).splits
        if base not in allowed:
            raise ValueError(f"Invalid split {split!r} for {self.info(data_dir).name} (allowed: {', '.join(allowed)})")
        source = "train" if base == "train" else "validation"
        images, labels = _digits_partition()[source]
        if self.spurious:
            prob = {"train": SPURIOUS_TRAIN_ALIGNMENT, "validation": 0.0, "validation_aligned": 1.0}[base]
            images = _with_cue(images, labels, prob, SPURIOUS_SEED + ("train", "validation", "validation_aligned").index(base))
        return _select(ArraySplit(images, labels), start, stop)


class _SpuriousDigitsSource(_DigitsSource):
    spurious = True


class SyntheticSplit(Sequence):
    """Random RGB images with random labels, generated from (seed, index)."""

    def __init__(self, size: int, img_size: int, num_classes: int, seed: int) -> None:
        self.size, self.img_size, self.num_classes, self.seed = size, img_size, num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:  # type: ignore[override]
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        pixels = rng.integers(0, 256, (self.img_size, self.img_size, 3), dtype=np.uint8)
        return Image.fromarray(pixels, mode="RGB"), int(rng.integers(self.num_classes))


class _SyntheticSource:
    sizes: ClassVar[dict[str, int]] = {"train": 2048, "validation": 512}

    def info(self, data_dir: str | None, *, img_size: int | None = None, num_classes: int | None = None) -> DatasetInfo:
        return DatasetInfo(
            name="synthetic",
            num_classes=num_classes or 10,
            in_chans=3,
            image_size=img_size or 32,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            splits=tuple(self.sizes),
            crop_pct=1.0,
        )

    def split(self, split: str, data_dir: str | None, **hints: Any) -> Sequence:
        base, start, stop = parse_split(split)
        if base not in self.sizes:
            raise ValueError(f"Invalid split {split!r} for synthetic (allowed: {', '.join(self.sizes)})")
        info = self.info(data_dir, **hints)
        full = SyntheticSplit(self.sizes[base], info.image_size, info.num_classes, seed=list(self.sizes).index(base))
        idx = slice_indices(len(full), start, stop)
        return full if len(idx) == len(full) else Subset(full, idx)


class Subset(Sequence):
    def __init__(self, base: Sequence, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return self.base[self.indices[index]]


register_dataset("digits")(_DigitsSource)
register_dataset("digits_spurious")(_SpuriousDigitsSource)
register_dataset("synthetic")(_SyntheticSource)
