"""``tfds/<name>``: datasets prepared by TensorFlow Datasets, read by random access without TensorFlow.

Training workers read ``array_record`` files through ``tfds``' data sources: TFDS decodes each
record with NumPy and PIL (or OpenCV), and TensorFlow is never imported. That is the point: torch
and TensorFlow in one process segfaulted here, and the tf.data path leaked memory. Preparing a
dataset does need TensorFlow for most builders, so it runs in its own process
(``python -m pf_sweep.data prepare``, see ``prepare.py``).

Splits use TFDS's own slicing syntax (``train[:8192]``, ``train[10%:]``, ``train+test``), passed to
TFDS unchanged so its rounding rules apply. Labels come from the builder's ``supervised_keys``
(``real_label`` for ``imagenet2012_real``) unless the ``label_key`` hint names another feature; a
multi-label feature (a ``Sequence`` of ``ClassLabel``, possibly empty) becomes a fixed-width int64
array padded with ``LABEL_PAD`` so the DataLoader can batch it and ``train.evaluate`` can score it.

Opened data sources are cached per (name, split, data_dir) in each process; a split object holds
only those names, so it pickles into DataLoader worker processes, which open their own readers
(the cache is emptied in a forked child rather than sharing readers with the parent). Beware: a
process forked after its parent has *read* records can deadlock in riegeli, array_record's reader
library (a background cleaner thread's mutex is copied locked). A trial's main process only opens
splits and lets its workers read, so forked workers are safe there; a process that reads first
should start its workers with ``multiprocessing_context="forkserver"`` or ``"spawn"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pf_sweep.data.registry import DatasetInfo

ARRAY_RECORD = "array_record"
# timm's IMAGENET_DEFAULT_MEAN/STD, spelled out: importing timm would load torch into the prepare
# process, which also loads TensorFlow.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
LABEL_PAD = -1
# Widest label set a multi-label split may hold (ImageNet ReaL's are far smaller); wider raises an error.
MULTI_LABEL_WIDTH = 16
# Where ImageNet's augmentation defaults would destroy the content: digits must not be mirrored,
# and an 8x8 digit does not survive a crop of 8% of its area.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "pf_digits": {"scale": (0.85, 1.0), "ratio": (0.9, 1.1), "hflip": 0.0},
    "mnist": {"hflip": 0.0},
    "svhn_cropped": {"hflip": 0.0},
}


class DatasetNotPreparedError(FileNotFoundError):
    """A ``tfds/<name>`` dataset that is missing, or present only in a format without random access."""


class TfdsSource:
    """``DatasetSource`` of one TFDS dataset (``name`` may carry a config and version: ``pf_digits/224:1.0.0``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def info(self, data_dir: str | None, *, label_key: str | None = None, **hints: Any) -> DatasetInfo:
        builder = _builder(self.name, data_dir)
        image_key, label_key = _keys(builder, label_key)
        num_classes = _class_label(builder, label_key)[0].num_classes
        height, width, channels = builder.info.features[image_key].shape
        if channels not in (1, 3):
            raise ValueError(f"tfds/{self.name}: image feature {image_key!r} has {channels} channels (supported: 1, 3)")
        native = height if height is not None and height == width else None
        splits = tuple(builder.info.splits)
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        if channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        defaults = {"crop_pct": 1.0} if native else {}  # a fixed-size dataset is evaluated whole
        defaults.update(DATASET_DEFAULTS.get(_base_name(self.name), {}))
        return DatasetInfo(
            name=f"tfds/{self.name}",
            num_classes=num_classes,
            in_chans=channels,
            image_size=native or DEFAULT_IMAGE_SIZE,
            mean=tuple(mean),
            std=tuple(std),
            splits=splits,
            default_val_split=next((s for s in ("validation", "test") if s in splits), "validation"),
            **defaults,
        )

    def split(
        self,
        split: str,
        data_dir: str | None,
        *,
        label_key: str | None = None,
        label_width: int = MULTI_LABEL_WIDTH,
        **hints: Any,
    ) -> TfdsSplit:
        builder = _builder(self.name, data_dir)
        image_key, label_key = _keys(builder, label_key)
        multi_label = _class_label(builder, label_key)[1]
        data = TfdsSplit(self.name, split, data_dir, image_key, label_key, label_width if multi_label else None)
        len(data)  # open it now: a bad split fails here, not in a DataLoader worker
        return data


class TfdsSplit(Sequence):
    """One split as ``(PIL.Image, label)``: an int, or a ``LABEL_PAD``-padded int64 array for label sets."""

    def __init__(
        self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str, label_width: int | None
    ) -> None:
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key, self.label_width = image_key, label_key, label_width

    def __len__(self) -> int:
        return len(_open(self.name, self.split, self.data_dir))

    def __getitem__(self, index: int) -> tuple[Image.Image, Any]:  # type: ignore[override]
        source = _open(self.name, self.split, self.data_dir)
        if not 0 <= index < len(source):
            raise IndexError(index)
        example = source[index]
        return to_pil(example[self.image_key]), self._label(example[self.label_key])

    def _label(self, value: Any) -> int | np.ndarray:
        if self.label_width is None:
            return int(value)
        labels = np.asarray(value, dtype=np.int64).reshape(-1)
        if len(labels) > self.label_width:
            raise ValueError(
                f"tfds/{self.name}:{self.split}: an example has {len(labels)} labels in {self.label_key!r}, more than "
                f"label_width={self.label_width}; pass a larger label_width hint"
            )
        padded = np.full(self.label_width, LABEL_PAD, dtype=np.int64)
        padded[: len(labels)] = labels
        return padded


def to_pil(image: np.ndarray) -> Image.Image:
    """A decoded HxWxC uint8 array (C = 1 or 3) as a PIL image, which timm's transforms expect."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        return Image.fromarray(image[..., 0], mode="L")
    return Image.fromarray(image, mode="RGB")


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def _keys(builder: Any, label_key: str | None) -> tuple[str, str]:
    """(image feature, label feature): the builder's supervised keys, the label overridable by a hint."""
    keys = builder.info.supervised_keys
    image_key, default_label = (
        keys if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys) else ("image", "label")
    )
    label_key = label_key or default_label
    features = builder.info.features
    for role, key in (("image", image_key), ("label", label_key)):
        if key not in features:
            raise ValueError(f"tfds/{builder.name}: no {role} feature {key!r} (features: {', '.join(features)})")
    return image_key, label_key


def _class_label(builder: Any, key: str) -> tuple[Any, bool]:
    """The ``ClassLabel`` of the label feature, and whether it is a label set (``Sequence(ClassLabel)``)."""
    feature = builder.info.features[key]
    is_set = isinstance(feature, tfds.features.Sequence)
    inner = feature.feature if is_set else feature
    if not isinstance(inner, tfds.features.ClassLabel):
        raise ValueError(
            f"tfds/{builder.name}: label feature {key!r} is {type(feature).__name__}, expected ClassLabel or Sequence(ClassLabel)"
        )
    return inner, is_set


def file_formats(info: Any) -> set[str]:
    """Formats listed in dataset_info.json.

    Read from the proto because TFDS (4.9.10) restores a converted dataset's alternative formats
    into it but not into the list ``as_data_source`` consults, when the builder comes from code
    (cifar10, imagenet2012) rather than from the files alone.
    """
    return {f for f in (info.as_proto.file_format, *info.as_proto.alternative_file_formats) if f}


def command(verb: str, name: str, data_dir: str | None) -> str:
    """The ``python -m pf_sweep.data`` command line that prepares or converts ``name``."""
    return f"python -m pf_sweep.data {verb} {name}" + (f" --data-dir {data_dir}" if data_dir else "")


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _builder(name: str, data_dir: str | None) -> Any:
    return _cached_builder(name, data_dir, _mock_context())


@functools.cache
def _cached_builder(name: str, data_dir: str | None, mock: object | None) -> Any:
    """``mock`` (see ``_mock_context``) is part of the key: what one ``tfds.testing.mock_data`` served
    is never served outside it, nor inside another one (with other examples)."""
    with _quiet_absl():  # TFDS warns about the very folders our errors explain
        return _checked_builder(name, data_dir)


def _checked_builder(name: str, data_dir: str | None) -> Any:
    """The builder of a dataset prepared with random access, or one error naming the command that fixes it."""
    # etils (TFDS's file layer) sends gs:// and s3:// paths through TensorFlow's gfile whenever
    # TensorFlow is installed (the prepare extra installs it); fsspec keeps TensorFlow out of readers.
    os.environ.setdefault("EPATH_USE_TF", "false")
    where = data_dir or "the default TFDS data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise DatasetNotPreparedError(
            f"tfds/{name} is not prepared in {where}, and TFDS has no builder of that name. Prepare it with: "
            f"{command('prepare', name, data_dir)} --module <module defining its builder>"
        ) from None
    if _served_by_mock_data():
        return builder  # tfds.testing.mock_data generates every record: nothing is on disk to check
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"tfds/{name} is not prepared in {where} (nothing at {builder.data_dir}). "
            f"Prepare it once with: {command('prepare', name, data_dir)}"
        )
    formats = file_formats(builder.info)
    if ARRAY_RECORD not in formats:
        raise DatasetNotPreparedError(
            f"tfds/{name} at {builder.data_dir} is prepared as {', '.join(sorted(formats)) or 'unknown'} only; training reads "
            f"array_record (random access). Convert it in place once with: {command('convert', name, data_dir)}"
        )
    if ARRAY_RECORD not in {f.value for f in builder.info.available_file_formats()}:
        builder.info.add_alternative_file_format(ARRAY_RECORD)  # see file_formats
    return builder


def _mock_context() -> object | None:
    """The active ``tfds.testing.mock_data`` (its ``as_data_source``, a new function per context), or None."""
    return tfds.core.DatasetBuilder.as_data_source if _served_by_mock_data() else None


def _served_by_mock_data() -> bool:
    """Whether ``tfds.testing.mock_data`` is active: it replaces ``as_data_source`` with its own, which
    serves random records of the dataset's features whether or not (its default policy) metadata exists.
    Users test their pipelines that way, so pf-sweep's reader must accept it."""
    served_by = getattr(tfds.core.DatasetBuilder.as_data_source, "__module__", "")
    return served_by == "tensorflow_datasets.testing.mocking"


def _open(name: str, split: str, data_dir: str | None) -> Sequence:
    return _cached_open(name, split, data_dir, _mock_context())


@functools.cache
def _cached_open(name: str, split: str, data_dir: str | None, mock: object | None) -> Sequence:
    builder = _builder(name, data_dir)
    try:
        return builder.as_data_source(split=split, file_format=ARRAY_RECORD)
    except (ValueError, KeyError) as err:
        raise ValueError(f"Invalid split {split!r} for tfds/{name} (splits: {', '.join(builder.info.splits)}): {err}") from None


# A forked DataLoader worker opens its own readers instead of sharing the parent's file handles.
os.register_at_fork(after_in_child=_cached_open.cache_clear)
