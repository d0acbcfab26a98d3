"""``tfds/<name>`` datasets: prepared by ``python -m pf_sweep.data`` in subprocesses, read without TensorFlow.

Every dataset here is built offline in the test: ``pf_digits`` (scikit-learn's handwritten digits)
in array_record and in tfrecord, its 224x224 JPEG config, and ``toy_real``, a ReaL-style multi-label
set whose builder module this file writes and passes with ``--module``. References are computed
here independently: digit pixels from scikit-learn's raw 0..16 values with integer rounding, the
built-in ``digits`` partition from its seed, split slices from hand-computed TFDS rounding, ReaL
scores from a per-image loop. ``cifar10`` is never downloaded: ``tfds.testing.mock_data`` serves
random examples under metadata this file writes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image
from sklearn.datasets import load_digits
from tensorflow_datasets.core import naming
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import PILToTensor

from pf_sweep import TrialConfig, run_trial
from pf_sweep.data import ShardedSampler, TransformedSplit, build_loader, build_transform, get_source
from pf_sweep.data.builtin import DIGITS_SPLIT_SEED
from pf_sweep.data.registry import slice_indices
from pf_sweep.data.tfds_source import LABEL_PAD, MULTI_LABEL_WIDTH, DatasetNotPreparedError
from pf_sweep.session import LocalSession
from pf_sweep.train import evaluate

pytestmark = pytest.mark.slow
CLI = (sys.executable, "-m", "pf_sweep.data")
TOY_REAL_CLASSES = 8
NOT_TIMING = lambda df: df[[c for c in df.columns if not c.startswith("time/")]]  # noqa: E731


def toy_real_label_sets() -> list[list[int]]:
    """40 label sets of 0-3 classes out of 8, some empty (ReaL leaves ambiguous images unlabelled)."""
    rng = np.random.RandomState(5)
    return [sorted(rng.choice(TOY_REAL_CLASSES, rng.randint(0, 4), replace=False).tolist()) for _ in range(40)]


TOY_REAL_BUILDER = f"""
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

LABEL_SETS = {toy_real_label_sets()!r}


class ToyReal(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({{
                "image": tfds.features.Image(shape=(4, 4, 1), encoding_format="png"),
                "original_label": tfds.features.ClassLabel(num_classes={TOY_REAL_CLASSES}),
                "real_label": tfds.features.Sequence(tfds.features.ClassLabel(num_classes={TOY_REAL_CLASSES})),
            }}),
            supervised_keys=("image", "real_label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {{"validation": self._generate_examples()}}

    def _generate_examples(self):
        rng = np.random.RandomState(0)
        for i, labels in enumerate(LABEL_SETS):
            image = Image.fromarray(rng.randint(0, 256, (4, 4)).astype(np.uint8), mode="L")
            yield i, {{"image": image, "original_label": i % {TOY_REAL_CLASSES}, "real_label": labels}}
"""

TFRECORD_PREPARE = """
import sys
import pf_sweep.data.tfds_digits, tensorflow_datasets as tfds
tfds.builder("pf_digits", data_dir=sys.argv[1]).download_and_prepare(file_format="tfrecord")
"""


# ----------------------------------------------------------------------------------------- fixtures


def run_all(*commands: tuple[str, ...], cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """Run commands side by side: each spends seconds importing TFDS, torch or TensorFlow."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd) for c in commands]
    outputs = [p.communicate() for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Data dirs, each built by its own process: ``digits``, ``digits224`` and ``real`` (toy_real) in
    array_record, ``tfrecord`` (pf_digits) in tfrecord only."""
    root = tmp_path_factory.mktemp("tfds")
    dirs = {k: str(root / k) for k in ("digits", "digits224", "tfrecord", "real")}
    package = root / "toy_datasets"  # TFDS finds a builder's resources by package, so not a lone .py file
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy_real.py").write_text(TOY_REAL_BUILDER)
    for done in run_all(
        (*CLI, "prepare", "pf_digits", "--data-dir", dirs["digits"]),
        (*CLI, "prepare", "pf_digits/224", "--data-dir", dirs["digits224"]),
        (*CLI, "prepare", "toy_real", "--data-dir", dirs["real"], "--module", "toy_datasets.toy_real"),
        (sys.executable, "-c", TFRECORD_PREPARE, dirs["tfrecord"]),
        cwd=root,
    ):
        check(done)
    return dirs


@pytest.fixture(scope="module")
def sklearn_split() -> dict[str, list[tuple[bytes, int]]]:
    """The built-in digits partition recomputed from scikit-learn: (uint8 pixel bytes, label) per example, in order."""
    bunch = load_digits()
    pixels = ((bunch.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)  # round(v * 255 / 16), half up
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(pixels))
    keyed = [(pixels[i].tobytes(), int(bunch.target[i])) for i in order]
    return {"train": keyed[:1437], "test": keyed[1437:]}


def keyed(split) -> list[tuple[bytes, int]]:
    return [(np.asarray(image, dtype=np.uint8).tobytes(), label) for image, label in (split[i] for i in range(len(split)))]


# ----------------------------------------------------------------------------------------- reading pf_digits


def test_pf_digits_info_is_one_channel_8x8_ten_classes_with_train_and_test(data):
    info = get_source("tfds/pf_digits").info(data["digits"])
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 8)
    assert info.splits == ("train", "test")
    assert info.default_val_split == "test"
    assert (info.hflip, info.crop_pct) == (0.0, 1.0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_pf_digits_reads_back_pixel_exact_in_the_source_order(data, sklearn_split, split):
    read = get_source("tfds/pf_digits").split(split, data["digits"])
    image, label = read[0]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (8, 8)
    assert type(label) is int
    assert keyed(read) == sklearn_split[split]


@pytest.mark.parametrize(
    ("spec", "start", "stop"),
    [  # TFDS rounds percent bounds to the closest example: 10% of 1437 = 143.7 -> 144
        ("train[:100]", 0, 100),
        ("train[10%:]", 144, 1437),
        ("train[-50:]", 1387, 1437),
        ("train[:33%]", 0, 474),
        ("test[25%:75%]", 90, 270),
        ("test[-10%:]", 324, 360),
    ],
)
def test_tfds_slicing_selects_the_hand_computed_range_and_agrees_with_slice_indices(data, sklearn_split, spec, start, stop):
    base = spec.split("[")[0]
    read = keyed(get_source("tfds/pf_digits").split(spec, data["digits"]))
    assert read == sklearn_split[base][start:stop]
    bounds = spec[spec.index("[") + 1 : -1].split(":")
    assert slice_indices(len(sklearn_split[base]), bounds[0] or None, bounds[1] or None) == range(start, stop)


def test_a_bound_without_percent_next_to_one_with_percent_is_a_percent_too_as_in_tfds(data, sklearn_split):
    read = keyed(get_source("tfds/pf_digits").split("test[-10%:-5]", data["digits"]))
    assert read == sklearn_split["test"][324:342]  # -5% of 360 = -18, not the 5th example from the end


@pytest.mark.parametrize("spec", ["validation", "train[:5000]", "train[1:2:3]"])
def test_bad_split_is_a_value_error_naming_the_splits(data, spec):
    with pytest.raises(ValueError, match=r"Invalid split .* for tfds/pf_digits \(splits: train, test\)"):
        get_source("tfds/pf_digits").split(spec, data["digits"])


def test_pf_digits_224_config_is_the_same_digits_upscaled_to_rgb_jpeg(data):
    source = get_source("tfds/pf_digits/224")
    info = source.info(data["digits224"])
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 3, 224)
    big, small = source.split("test[:40]", data["digits224"]), get_source("tfds/pf_digits").split("test[:40]", data["digits"])
    for (image, label), (digit, digit_label) in zip(big, small, strict=True):
        assert image.mode == "RGB" and image.size == (224, 224) and label == digit_label
        expected = np.asarray(digit.resize((224, 224), Image.Resampling.NEAREST).convert("RGB"), dtype=np.float64)
        assert np.abs(np.asarray(image, dtype=np.float64) - expected).mean() < 1.0  # JPEG at quality 90 on flat blocks


def test_split_pickles_to_an_equal_split(data):
    split = get_source("tfds/pf_digits").split("test", data["digits"])
    assert keyed(pickle.loads(pickle.dumps(split))) == keyed(split)


# ----------------------------------------------------------------------------------------- sharding


def shard_examples(split, *, rank: int, epoch: int, seed: int = 3, workers: int = 0) -> list[tuple[bytes, int]]:
    """What one of two ranks loads in one training epoch: (pixel bytes, label) per example, in order."""
    sampler = ShardedSampler(len(split), num_replicas=2, rank=rank, shuffle=True, seed=seed, with_epoch=True)
    sampler.set_epoch(epoch)
    dataset = TransformedSplit(split, PILToTensor(), seed=seed)
    if workers:
        # Fresh worker processes: array_record's reader library (riegeli) can deadlock in a process
        # forked after its parent read records, and this test process has read plenty.
        loader = DataLoader(dataset, batch_size=50, sampler=sampler, num_workers=workers, multiprocessing_context="forkserver")
    else:
        loader = build_loader(dataset, sampler, batch_size=50)
    return [(x.numpy().tobytes(), int(y)) for xs, ys in loader for x, y in zip(xs, ys, strict=True)]


def test_two_ranks_load_every_example_exactly_once_per_epoch(data):
    split = get_source("tfds/pf_digits").split("train", data["digits"])
    for epoch in (0, 1):
        shards = [shard_examples(split, rank=r, epoch=epoch) for r in (0, 1)]
        assert abs(len(shards[0]) - len(shards[1])) <= 1
        assert Counter(shards[0]) + Counter(shards[1]) == Counter(keyed(split))


def test_shard_order_changes_with_the_epoch_and_repeats_for_the_same_seed_and_epoch(data):
    split = get_source("tfds/pf_digits").split("train", data["digits"])
    first = shard_examples(split, rank=0, epoch=0)
    assert shard_examples(split, rank=0, epoch=0) == first
    assert shard_examples(split, rank=0, epoch=1) != first
    assert shard_examples(split, rank=0, epoch=0, seed=4) != first


def test_two_loader_worker_processes_load_the_same_shard_as_the_main_process(data):
    split = get_source("tfds/pf_digits").split("train[:400]", data["digits"])
    assert shard_examples(split, rank=1, epoch=2, workers=2) == shard_examples(split, rank=1, epoch=2)


# ----------------------------------------------------------------------------------------- trials

DIGITS_TRIAL = {"epochs": 2, "lr": 0.05, "batch_size": 64, "seed": 1}


def pf_digits_trial(data_dir: str, **changes) -> TrialConfig:
    """The built-in digits trial on ``tfds/pf_digits``: same examples in the same order, same normalisation."""
    return TrialConfig(
        dataset="tfds/pf_digits", data_dir=data_dir, val_split="test", mean=(0.5,), std=(0.5,), **DIGITS_TRIAL, **changes
    )


@pytest.fixture(scope="module")
def builtin_digits_history() -> pd.DataFrame:
    return NOT_TIMING(run_trial(TrialConfig(**DIGITS_TRIAL), local=True, storage_path=None).history)


def test_pf_digits_trial_equals_the_builtin_digits_trial(data, builtin_digits_history):
    history = run_trial(pf_digits_trial(data["digits"]), local=True, storage_path=None).history
    pd.testing.assert_frame_equal(NOT_TIMING(history), builtin_digits_history)
    assert history["val/top1"].iloc[-1] > 80.0


def write_cifar10_metadata(data_dir: Path) -> None:
    """dataset_info.json + features.json of an array_record cifar10 (50,000 / 10,000): what mock_data reads."""
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    template = naming.ShardedFileTemplate(
        data_dir=builder.data_dir,
        dataset_name="cifar10",
        filetype_suffix="array_record",
        template=naming.DEFAULT_FILENAME_TEMPLATE,
    )
    splits = [
        tfds.core.SplitInfo(name=n, shard_lengths=[k], num_bytes=0, filename_template=template)
        for n, k in (("train", 50_000), ("test", 10_000))
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.set_file_format("array_record", override=True)
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


def test_mocked_cifar10_trial_feeds_32x32x3_images_to_a_10_class_model(tmp_path, monkeypatch):
    import pf_sweep.train

    write_cifar10_metadata(tmp_path)
    seen: dict[str, object] = {}
    build_model = pf_sweep.train.build_model

    def spy_build_model(cfg, info):
        model = build_model(cfg, info)
        model.register_forward_hook(lambda m, args, out: seen.update(input=tuple(args[0].shape[1:]), classes=out.shape[-1]))
        return model

    monkeypatch.setattr(pf_sweep.train, "build_model", spy_build_model)
    cfg = TrialConfig(
        dataset="tfds/cifar10",
        data_dir=str(tmp_path),
        val_split="test",
        model="pf_cnn_tiny",
        epochs=1,
        batch_size=16,
        train_eval_size=16,
    )
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
        result = run_trial(cfg, local=True, storage_path=None)
    assert seen == {"input": (3, 32, 32), "classes": 10}
    assert 0.0 <= result.metrics["val/top1"] <= 100.0
    assert math.isfinite(result.metrics["train/loss"])


# ----------------------------------------------------------------------------------------- multi-label (ReaL)


def test_real_style_labels_come_padded_with_minus_one_to_a_fixed_width(data):
    split = get_source("tfds/toy_real").split("validation", data["real"])
    expected = toy_real_label_sets()
    assert len(split) == len(expected)
    for i, labels in enumerate(expected):
        label = split[i][1]
        assert label.shape == (MULTI_LABEL_WIDTH,) and label.dtype == np.int64
        assert label.tolist() == labels + [LABEL_PAD] * (MULTI_LABEL_WIDTH - len(labels))


def test_label_key_hint_reads_another_label_feature(data):
    split = get_source("tfds/toy_real").split("validation", data["real"], label_key="original_label")
    assert [split[i][1] for i in range(len(split))] == [i % TOY_REAL_CLASSES for i in range(len(split))]


def test_label_set_scores_on_hand_made_logits():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[2, -1], [-1, -1], [0, 1], [1, 0]])  # hit, excluded (empty), miss, miss
    metrics = evaluate(nn.Identity(), [(logits, y)], LocalSession(), amp=False)
    p = logits.softmax(-1)
    expected_loss = -(p[0, 2].log() + (p[2, 0] + p[2, 1]).log() + (p[3, 1] + p[3, 0]).log()) / 3
    assert metrics["top1"] == pytest.approx(100 / 3)
    assert metrics["top5"] == pytest.approx(100.0)  # four classes: every label is in the top 5
    assert metrics["loss"] == pytest.approx(expected_loss.item())


def test_real_top1_through_a_loader_equals_a_per_image_reference(data):
    source = get_source("tfds/toy_real")
    info, split = source.info(data["real"]), source.split("validation", data["real"])
    transform = build_transform(TrialConfig(), info, training=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, TOY_REAL_CLASSES))
    loader = build_loader(TransformedSplit(split, transform), ShardedSampler(len(split)), batch_size=7)
    metrics = evaluate(model, loader, LocalSession(), amp=False)

    hits, top5_hits, loss, counted = 0, 0, 0.0, 0
    for (image, _), labels in zip(split, toy_real_label_sets(), strict=True):
        if not labels:
            continue
        logits = model(transform(image)[None])[0].double()
        ranked = logits.argsort(descending=True).tolist()
        counted += 1
        hits += ranked[0] in labels
        top5_hits += any(c in labels for c in ranked[:5])
        loss -= math.log(sum(logits.softmax(-1)[c].item() for c in labels))
    assert 0 < counted < len(split) and 0 < hits < counted
    assert metrics["top1"] == pytest.approx(100.0 * hits / counted)
    assert metrics["top5"] == pytest.approx(100.0 * top5_hits / counted)
    assert metrics["loss"] == pytest.approx(loss / counted, rel=1e-5)


def test_single_label_evaluation_is_unchanged_cross_entropy_top1_top5():
    torch.manual_seed(0)
    logits, y = torch.randn(20, 7), torch.randint(0, 7, (20,))
    metrics = evaluate(nn.Identity(), [(logits[:8], y[:8]), (logits[8:], y[8:])], LocalSession(), amp=False)
    top5 = logits.topk(5, dim=-1).indices
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item())
    assert metrics["top1"] == pytest.approx(100.0 * (logits.argmax(-1) == y).float().mean().item())
    assert metrics["top5"] == pytest.approx(100.0 * (top5 == y[:, None]).any(-1).float().mean().item())


# ----------------------------------------------------------------------------------------- errors, convert, info


def test_unprepared_dataset_raises_one_error_naming_the_prepare_command(tmp_path):
    cfg = TrialConfig(dataset="tfds/cifar10", data_dir=str(tmp_path))
    # run_trial refuses it before training, as bad input (ValueError); the reader itself raises
    # DatasetNotPreparedError (a FileNotFoundError) with the same command.
    command = rf"python -m pf_sweep.data prepare cifar10 --data-dir {tmp_path}$"
    with pytest.raises(ValueError, match=command):
        run_trial(cfg, local=True, storage_path=None)
    with pytest.raises(DatasetNotPreparedError, match=command):
        get_source("tfds/cifar10").info(str(tmp_path))


def test_unknown_dataset_error_names_prepare_with_a_builder_module(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare no_such_set --data-dir .* --module <module defining its builder>"):
        get_source("tfds/no_such_set").info(str(tmp_path))


NO_TF_CONVERT = """
import importlib.machinery, sys
from pf_sweep.data.prepare import main

class NoTensorFlow:  # every tensorflow import fails, as where the prepare extra is not installed
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] == "tensorflow" else None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, NoTensorFlow())
sys.exit(main(sys.argv[1:]))
"""


def test_tfrecord_only_dataset_names_convert_and_convert_makes_it_readable(data, sklearn_split):
    directory = data["tfrecord"]
    with pytest.raises(
        DatasetNotPreparedError, match=rf"tfrecord only.*python -m pf_sweep.data convert pf_digits --data-dir {directory}$"
    ):
        get_source("tfds/pf_digits").split("train", directory)
    (without_tf,) = run_all((sys.executable, "-c", NO_TF_CONVERT, "convert", "pf_digits", "--data-dir", directory))
    assert without_tf.returncode == 2
    assert without_tf.stderr.splitlines()[-1] == (
        "pf_sweep.data convert: error: this needs TensorFlow, which is not installed: pip install -e '.[prepare]'"
    )
    check(run_all((*CLI, "convert", "pf_digits", "--data-dir", directory))[0])
    assert keyed(get_source("tfds/pf_digits").split("train", directory)) == sklearn_split["train"]


def test_cli_bad_input_exits_2_with_one_message(tmp_path):
    unknown, manual = run_all(
        (*CLI, "info", "no_such_set", "--data-dir", str(tmp_path)),
        (*CLI, "prepare", "imagenet2012", "--data-dir", str(tmp_path)),
    )
    for done in (unknown, manual):  # TFDS may log warnings before it; ours is one line, the last
        assert done.returncode == 2, done.stderr
        assert [line for line in done.stderr.splitlines() if "error" in line] == done.stderr.splitlines()[-1:]
    assert unknown.stderr.splitlines()[-1].startswith("pf_sweep.data info: error: no TFDS dataset named 'no_such_set'")
    assert manual.stderr.splitlines()[-1].startswith(
        "pf_sweep.data prepare: error: imagenet2012 needs files you download yourself"
    )
    assert "--manual-dir" in manual.stderr and "ILSVRC2012_img_train.tar" in manual.stderr


def test_info_prints_splits_sizes_features_and_format(data):
    out = check(run_all((*CLI, "info", "pf_digits", "--data-dir", data["digits"]))[0]).stdout
    assert "formats:  array_record" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("  t")] == [["train", "1,437"], ["test", "360"]]
    assert "Image(shape=(8, 8, 1), dtype=uint8)" in out and "num_classes=10" in out


# ----------------------------------------------------------------------------------------- no TensorFlow


NO_TF_TRIAL = """
import json, sys
from pf_sweep import TrialConfig, run_trial
from pf_sweep.data import get_source
history = run_trial(TrialConfig.from_dict(json.loads(sys.argv[1])), local=True, storage_path=None).history
get_source("tfds/pf_digits/224").split("train[:5]", sys.argv[2])[4]
tensorflow = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
print(json.dumps({"tensorflow": tensorflow, "history": history.to_dict("list")}))
"""


def test_a_tfds_trial_with_two_loader_workers_never_imports_tensorflow_and_equals_the_builtin_trial(
    data, builtin_digits_history, tmp_path
):
    """A fresh process whose ``tensorflow`` is a tripwire: importing it, in the trial process or in any
    DataLoader worker (forkserver children inherit PYTHONPATH), leaves a marker file and fails."""
    tripwire = tmp_path / "tripwire" / "tensorflow"
    tripwire.mkdir(parents=True)
    marker = tmp_path / "tensorflow-imported"
    (tripwire / "__init__.py").write_text(
        f"import os\nopen({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')\nraise ImportError('tripwire')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tripwire.parent), os.environ.get("PYTHONPATH", "")])}
    cfg = json.dumps(pf_digits_trial(data["digits"], loader_workers=2).to_dict())
    done = subprocess.run(
        [sys.executable, "-c", NO_TF_TRIAL, cfg, data["digits224"]], capture_output=True, text=True, env=env, timeout=300
    )
    out = check(done).stdout
    assert not marker.exists(), f"tensorflow was imported by pid(s) {marker.read_text().split()}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["tensorflow"] == []
    pd.testing.assert_frame_equal(NOT_TIMING(pd.DataFrame(report["history"])), builtin_digits_history)


def test_prepare_process_loads_neither_torch_nor_timm():
    # `prepare` imports TensorFlow; torch beside it segfaulted here, so the CLI must not load torch.
    code = "import sys, pf_sweep.data.prepare; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_spelled_out_imagenet_constants_match_timm():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from pf_sweep.data import tfds_source

    assert tfds_source.IMAGENET_DEFAULT_MEAN == IMAGENET_DEFAULT_MEAN
    assert tfds_source.IMAGENET_DEFAULT_STD == IMAGENET_DEFAULT_STD
