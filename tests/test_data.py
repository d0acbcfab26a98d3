"""Built-in datasets, split slicing, the sharded sampler and seeded augmentation (pf_sweep.data).

References are computed here independently: the digits pixels from scikit-learn's raw 0..16 values
with integer rounding, the spurious cue from the difference to the plain digits image, the
evaluation transform from the pixel formula (x / 255 - mean) / std.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pf_sweep.config import TrialConfig
from pf_sweep.data import ShardedSampler, TransformedSplit, build_transform, dataset_names, get_source, is_known_dataset
from pf_sweep.data.builtin import CUE_PIXELS

# ----------------------------------------------------------------------------------------- helpers


def pixels(split) -> np.ndarray:
    return np.stack([np.asarray(split[i][0]) for i in range(len(split))])


def labels(split) -> list[int]:
    return [split[i][1] for i in range(len(split))]


def keyed(split) -> list[tuple[bytes, int]]:
    """Each example as (uint8 pixel bytes, label): comparable across splits and with scikit-learn."""
    return [(np.asarray(image, dtype=np.uint8).tobytes(), label) for image, label in (split[i] for i in range(len(split)))]


@pytest.fixture(scope="module")
def sklearn_digits() -> Counter:
    """All 1797 scikit-learn digits as a multiset of (pixel bytes, label), 0..16 mapped to 0..255 with rounding."""
    bunch = load_digits()
    raw = bunch.images.astype(np.int64)  # integers 0..16
    scaled = ((raw * 255 + 8) // 16).astype(np.uint8)  # round(v * 255 / 16), half up (only v=8 is a tie: 127.5 -> 128)
    return Counter((img.tobytes(), int(t)) for img, t in zip(scaled, bunch.target, strict=True))


@pytest.fixture(scope="module")
def digits():
    return get_source("digits")


@pytest.fixture(scope="module")
def spurious():
    return get_source("digits_spurious")


# ----------------------------------------------------------------------------------------- registry


def test_builtin_datasets_are_registered():
    assert {"digits", "digits_spurious", "synthetic"} <= set(dataset_names())


def test_tfds_names_are_known_and_other_names_are_not():
    assert is_known_dataset("tfds/cifar10")
    assert not is_known_dataset("tfds/")
    assert not is_known_dataset("cifar10")


def test_get_source_rejects_unknown_dataset():
    with pytest.raises(ValueError, match=r"Invalid dataset: 'mnist'"):
        get_source("mnist")


# ----------------------------------------------------------------------------------------- digits


def test_digits_has_1437_train_and_360_validation_examples(digits):
    assert len(digits.split("train", None)) == 1437
    assert len(digits.split("validation", None)) == 360


def test_digits_items_are_8x8_grayscale_pil_images_with_int_labels(digits):
    image, label = digits.split("train", None)[0]
    assert isinstance(image, Image.Image)
    assert image.mode == "L" and image.size == (8, 8)
    assert type(label) is int and 0 <= label < 10


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_digits_example_is_a_scikit_learn_digit_scaled_to_0_255(digits, sklearn_digits, split):
    examples = keyed(digits.split(split, None))
    missing = [i for i, key in enumerate(examples) if key not in sklearn_digits]
    assert missing == []


def test_digits_train_and_validation_partition_all_1797_examples(digits, sklearn_digits):
    train = Counter(keyed(digits.split("train", None)))
    validation = Counter(keyed(digits.split("validation", None)))
    assert not set(train) & set(validation)
    assert train + validation == sklearn_digits
    assert sum(sklearn_digits.values()) == 1797


def test_digits_read_without_scikit_learn_equal_load_digits_and_the_fallback(monkeypatch):
    from pf_sweep.data import builtin

    bunch = load_digits()
    images, target = builtin._digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)  # a layout without the CSV
    images, target = builtin._digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)


def test_loading_digits_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = "import sys; from pf_sweep.data import get_source; get_source('digits').split('train', None)"
    code += "; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_digits_info_describes_one_channel_8x8_ten_classes(digits):
    info = digits.info(None)
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 8)
    assert info.splits == ("train", "validation")


@pytest.mark.parametrize(
    ("spec", "base", "python_slice"),
    [
        ("train[:100]", "train", lambda n: slice(0, 100)),
        ("train[10%:20%]", "train", lambda n: slice(round(n * 0.1), round(n * 0.2))),
        ("train[-10%:]", "train", lambda n: slice(n - round(n * 0.1), n)),
        ("validation[-10:]", "validation", lambda n: slice(-10, None)),
        ("validation[5:-5]", "validation", lambda n: slice(5, -5)),
        ("train[:5000]", "train", lambda n: slice(0, 5000)),
    ],
)
def test_split_slicing_agrees_with_python_slicing_of_the_full_split(digits, spec, base, python_slice):
    full = keyed(digits.split(base, None))
    part = keyed(digits.split(spec, None))
    assert part == full[python_slice(len(full))]


@pytest.mark.parametrize("spec", ["test", "training", "train[", "train[1:2:3]", "train[a:b]", ""])
def test_bad_digits_split_raises_value_error(digits, spec):
    with pytest.raises(ValueError, match=r"Invalid split"):
        digits.split(spec, None)


# ----------------------------------------------------------------------------------------- digits_spurious


def cue_positions(spurious_split, plain_split) -> list[tuple[int, int] | None]:
    """Where the cue was painted: the one pixel that differs from the plain image (None if it was already 255)."""
    found = []
    for s_img, p_img in zip(pixels(spurious_split), pixels(plain_split), strict=True):
        diff = np.argwhere(s_img != p_img)
        found.append(tuple(int(v) for v in diff[0]) if len(diff) else None)
    return found


def aligned_fraction(spurious, digits, split: str, plain_split: str) -> float:
    s, p = spurious.split(split, None), digits.split(plain_split, None)
    marked = [(pos, label) for pos, label in zip(cue_positions(s, p), labels(s), strict=True) if pos is not None]
    return sum(pos == CUE_PIXELS[label] for pos, label in marked) / len(marked)


@pytest.mark.parametrize(
    ("split", "plain_split"), [("train", "train"), ("validation", "validation"), ("validation_aligned", "validation")]
)
def test_spurious_images_differ_from_digits_only_by_one_cue_pixel_set_to_255(spurious, digits, split, plain_split):
    s, p = spurious.split(split, None), digits.split(plain_split, None)
    assert labels(s) == labels(p)
    s_px, p_px = pixels(s), pixels(p)
    diff = s_px != p_px
    assert diff.reshape(len(s_px), -1).sum(axis=1).max() == 1
    for i, r, c in np.argwhere(diff):
        assert (int(r), int(c)) in CUE_PIXELS
        assert s_px[i, r, c] == 255


def test_spurious_train_cue_matches_the_class_about_90_percent_of_the_time(spurious, digits):
    assert 0.85 <= aligned_fraction(spurious, digits, "train", "train") <= 0.95


def test_spurious_validation_cue_matches_the_class_at_chance(spurious, digits):
    assert 0.05 <= aligned_fraction(spurious, digits, "validation", "validation") <= 0.15


def test_spurious_validation_aligned_cue_pixel_is_lit_for_every_example(spurious):
    split = spurious.split("validation_aligned", None)
    lit = [img[CUE_PIXELS[label]] == 255 for img, label in zip(pixels(split), labels(split), strict=True)]
    assert all(lit)


def test_spurious_cue_pixels_are_background_in_plain_digits(digits):
    # builtin.py: "digits' borders are almost always background, so the cue is salient".
    train = pixels(digits.split("train", None))
    inked = {pos: float((train[:, pos[0], pos[1]] > 0).mean()) for pos in CUE_PIXELS}
    assert {pos: f for pos, f in inked.items() if f > 0.05} == {}


def test_spurious_split_is_deterministic(spurious):
    assert keyed(spurious.split("train[:200]", None)) == keyed(get_source("digits_spurious").split("train[:200]", None))


def test_spurious_has_a_validation_aligned_split_and_plain_digits_does_not(spurious, digits):
    assert spurious.info(None).splits == ("train", "validation", "validation_aligned")
    with pytest.raises(ValueError, match=r"Invalid split 'validation_aligned' for digits"):
        digits.split("validation_aligned", None)


# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_examples_are_deterministic_per_index():
    a = get_source("synthetic").split("train", None)
    b = get_source("synthetic").split("train", None)
    for i in (0, 17, 2047):
        (img_a, label_a), (img_b, label_b) = a[i], b[i]
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b)) and label_a == label_b


def test_synthetic_examples_differ_between_indices_and_splits():
    train, val = get_source("synthetic").split("train", None), get_source("synthetic").split("validation", None)
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(train[1][0]))
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(val[0][0]))


def test_synthetic_honours_img_size_and_num_classes_hints():
    source = get_source("synthetic")
    info = source.info(None, img_size=12, num_classes=3)
    assert (info.image_size, info.num_classes, info.in_chans) == (12, 3, 3)
    split = source.split("validation", None, img_size=12, num_classes=3)
    assert len(split) == 512
    seen = set()
    for i in range(100):
        image, label = split[i]
        assert image.mode == "RGB" and image.size == (12, 12)
        seen.add(label)
    assert seen == {0, 1, 2}


def test_synthetic_defaults_to_32_pixels_and_10_classes():
    info = get_source("synthetic").info(None)
    assert (info.image_size, info.num_classes) == (32, 10)


def test_synthetic_slice_serves_the_same_examples_as_the_full_split():
    source = get_source("synthetic")
    full, part = source.split("train", None, img_size=4), source.split("train[100:110]", None, img_size=4)
    assert len(part) == 10
    for j in range(10):
        assert np.array_equal(np.asarray(part[j][0]), np.asarray(full[100 + j][0])) and part[j][1] == full[100 + j][1]


def test_synthetic_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"Invalid split 'test' for synthetic"):
        get_source("synthetic").split("test", None)


# ----------------------------------------------------------------------------------------- ShardedSampler


def shards(size: int, replicas: int = 2, epoch: int = 0, **kwargs) -> list[list[int]]:
    out = []
    for rank in range(replicas):
        sampler = ShardedSampler(size, num_replicas=replicas, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("size", [10, 11, 1, 0])
def test_eval_sampler_covers_every_index_exactly_once_across_ranks(size):
    a, b = shards(size)
    assert sorted(a + b) == list(range(size))


def test_eval_sampler_keeps_the_natural_order_within_a_rank():
    assert shards(7) == [[0, 2, 4, 6], [1, 3, 5]]


TRAIN = {"shuffle": True, "batch_multiple": 4, "seed": 3}


@pytest.mark.parametrize("size", [103, 96, 7, 8])
def test_train_sampler_never_gives_an_index_to_two_ranks(size):
    a, b = shards(size, **TRAIN)
    assert not set(a) & set(b)
    assert len(set(a)) == len(a) and len(set(b)) == len(b)


@pytest.mark.parametrize("size", [103, 96, 7, 8, 17])
def test_train_sampler_ranks_have_equal_length_multiple_of_batch(size):
    a, b = shards(size, **TRAIN)
    assert len(a) == len(b)
    assert len(a) % TRAIN["batch_multiple"] == 0


@pytest.mark.parametrize("size", [103, 96, 7, 8, 17])
def test_train_sampler_drops_fewer_than_replicas_times_batch(size):
    a, b = shards(size, **TRAIN)
    assert 0 <= size - len(a) - len(b) < 2 * TRAIN["batch_multiple"]
    assert set(a) | set(b) <= set(range(size))


def test_train_sampler_len_matches_iteration():
    sampler = ShardedSampler(103, num_replicas=2, rank=1, **TRAIN)
    assert len(sampler) == len(list(sampler)) == 48


def test_train_sampler_order_is_determined_by_seed_and_epoch():
    assert shards(103, epoch=5, **TRAIN) == shards(103, epoch=5, **TRAIN)


def test_train_sampler_order_changes_with_epoch():
    assert shards(103, epoch=0, **TRAIN) != shards(103, epoch=1, **TRAIN)


def test_train_sampler_set_epoch_changes_the_order_of_the_same_sampler():
    sampler = ShardedSampler(103, num_replicas=2, rank=0, **TRAIN)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_train_sampler_order_changes_with_seed():
    assert shards(103, **{**TRAIN, "seed": 3}) != shards(103, **{**TRAIN, "seed": 4})


def test_train_sampler_shuffles():
    a, _ = shards(96, **TRAIN)
    assert a != sorted(a)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_train_sampler_sees_every_example_once_when_size_is_a_multiple_of_replicas_times_batch(epoch):
    a, b = shards(96, epoch=epoch, **TRAIN)
    assert sorted(a + b) == list(range(96))


def test_train_sampler_eventually_sees_every_example_over_epochs():
    seen: set[int] = set()
    for epoch in range(30):
        a, b = shards(103, epoch=epoch, **TRAIN)
        seen |= set(a) | set(b)
    assert seen == set(range(103))


def test_sampler_with_epoch_yields_index_epoch_pairs():
    sampler = ShardedSampler(10, num_replicas=2, rank=1, with_epoch=True)
    sampler.set_epoch(4)
    assert list(sampler) == [(1, 4), (3, 4), (5, 4), (7, 4), (9, 4)]


def test_sampler_rejects_a_rank_outside_the_replicas():
    with pytest.raises(ValueError, match=r"Invalid rank 2 for 2 replicas"):
        ShardedSampler(10, num_replicas=2, rank=2)


# ----------------------------------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def synthetic_train() -> TransformedSplit:
    source = get_source("synthetic")
    cfg = TrialConfig(dataset="synthetic", img_size=16)
    split = source.split("train[:8]", None, img_size=16)
    return TransformedSplit(split, build_transform(cfg, source.info(None, img_size=16), training=True), seed=11)


def test_augmented_example_is_bitwise_identical_for_the_same_index_and_epoch(synthetic_train):
    torch.manual_seed(0)
    random.seed(0)
    first, label_first = synthetic_train[(3, 2)]
    torch.manual_seed(123)  # a different global state must not matter
    random.seed(123)
    torch.rand(5)
    second, label_second = synthetic_train[(3, 2)]
    assert torch.equal(first, second) and label_first == label_second


def test_augmentation_leaves_the_global_rngs_untouched(synthetic_train):
    torch.manual_seed(42)
    random.seed(42)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    synthetic_train[(5, 1)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_augmentation_equals_the_transform_run_after_seeding_the_global_rngs(synthetic_train):
    index, epoch = 6, 3
    seed = hash((synthetic_train.seed, epoch, index)) & 0x7FFF_FFFF_FFFF
    image, label = synthetic_train.split[index]
    random.seed(seed)
    torch.manual_seed(seed)
    expected = synthetic_train.transform(image)
    got, got_label = synthetic_train[(index, epoch)]
    assert torch.equal(got, expected) and got_label == label


def test_augmentation_differs_between_epochs(synthetic_train):
    assert not torch.equal(synthetic_train[(3, 0)][0], synthetic_train[(3, 1)][0])


def test_augmentation_differs_between_seeds(synthetic_train):
    other = TransformedSplit(synthetic_train.split, synthetic_train.transform, seed=12)
    assert not torch.equal(synthetic_train[(3, 0)][0], other[(3, 0)][0])


def test_augmented_digits_vary_across_epochs():
    source = get_source("digits")
    cfg = TrialConfig(scale=(0.3, 0.6))
    ds = TransformedSplit(source.split("train[:4]", None), build_transform(cfg, source.info(None), training=True))
    outputs = [ds[(0, epoch)][0] for epoch in range(4)]
    assert all(out.shape == (1, 8, 8) for out in outputs)
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])


def test_digits_eval_transform_is_pixels_scaled_to_minus_one_one():
    source = get_source("digits")
    split = source.split("validation[:16]", None)
    transform = build_transform(TrialConfig(), source.info(None), training=False)
    for image, _ in (split[i] for i in range(len(split))):
        expected = (torch.from_numpy(np.array(image)).double() / 255.0 - 0.5) / 0.5
        out = transform(image)
        assert out.shape == (1, 8, 8) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected.unsqueeze(0), rtol=0, atol=1e-6)


def test_eval_transform_ignores_augment_flag_and_epoch_key():
    source = get_source("digits")
    split = source.split("validation[:4]", None)
    ds = TransformedSplit(split, build_transform(TrialConfig(), source.info(None), training=False))
    assert torch.equal(ds[(2, 0)][0], ds[(2, 9)][0])
    assert torch.equal(ds[2][0], ds[(2, 0)][0])


def test_train_transform_without_augment_equals_eval_transform():
    source = get_source("digits")
    info = source.info(None)
    image = source.split("train", None)[0][0]
    cfg = TrialConfig(augment=False)
    assert torch.equal(build_transform(cfg, info, training=True)(image), build_transform(cfg, info, training=False)(image))


def test_config_mean_std_override_the_dataset_normalisation():
    source = get_source("digits")
    image = source.split("train", None)[0][0]
    out = build_transform(TrialConfig(mean=(0.25,), std=(2.0,)), source.info(None), training=False)(image)
    expected = (torch.from_numpy(np.array(image)).double() / 255.0 - 0.25) / 2.0
    torch.testing.assert_close(out.double(), expected.unsqueeze(0), rtol=0, atol=1e-6)


def test_transform_rejects_mean_with_the_wrong_channel_count():
    source = get_source("digits")
    cfg = TrialConfig(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"Invalid mean/std: 3 channels, but digits has 1"):
        build_transform(cfg, source.info(None), training=False)
