"""``pf_digits``: scikit-learn's handwritten digits as a TFDS dataset, for tests and benchmarks.

A real image dataset that prepares offline in about a second. Splits ``train`` (1,437) and ``test``
(360) are the built-in ``digits`` train/validation partition in the same order (shuffling disabled),
so index i of ``tfds/pf_digits`` and of ``digits`` is the same example.

Configs:
- ``8x8`` (default): the original 8x8 grayscale images as lossless PNG, pixel-identical to ``digits``;
- ``224``: the same images upscaled by nearest neighbour to 224x224 RGB, stored as JPEG (quality 90):
  decoding cost and file sizes like ImageNet's, for loader benchmarks.

Images are encoded here with PIL rather than by TFDS (which encodes arrays with TensorFlow), so the
stored bytes depend only on Pillow.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pf_sweep.data.builtin import _digits_partition

JPEG_QUALITY = 90


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    size: int = 8
    channels: int = 1
    encoding: str = "png"


def render(image: np.ndarray, config: DigitsConfig) -> bytes:
    """One uint8 8x8 digit as the config's encoded image bytes."""
    pil = Image.fromarray(image, mode="L")
    if config.size != image.shape[0]:
        pil = pil.resize((config.size, config.size), Image.Resampling.NEAREST)
    if config.channels == 3:
        pil = pil.convert("RGB")
    buffer = io.BytesIO()
    if config.encoding == "jpeg":
        pil.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


class PfDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits (UCI handwritten digits), 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 - TFDS reads this class attribute
    BUILDER_CONFIGS = [  # noqa: RUF012
        DigitsConfig(name="8x8", description="8x8 grayscale PNG, as in scikit-learn (0..16 scaled to 0..255)"),
        DigitsConfig(name="224", size=224, channels=3, encoding="jpeg", description="224x224 RGB JPEG, nearest upscaling"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        shape = (config.size, config.size, config.channels)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=shape, encoding_format=config.encoding),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        partition = _digits_partition()
        return {"train": self._generate_examples(*partition["train"]), "test": self._generate_examples(*partition["validation"])}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": render(image, self.builder_config), "label": int(label)}
