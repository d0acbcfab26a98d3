"""Images/s of a trial's training loader against ``tfds.load`` + tf.data, and its memory over epochs.

Issue #4 reads ``tfds/<name>`` datasets by random access (``array_record`` through ``tfds.data_source``)
with timm transforms in DataLoader workers, and never imports TensorFlow in training processes. This
checks what that costs against the reference tf.data path, on the same records, in one run:

- ours: exactly what ``train.build_data`` builds for a trial's training split:
  ``TransformedSplit(source.split(...), build_transform(cfg, info, training=True), seed)``,
  ``ShardedSampler(shuffle=True, with_epoch=True, batch_multiple=B)`` and ``build_loader(workers=W)``,
  for each W in ``--workers`` (0 = in the main process); rows interleaved epoch by epoch (round-robin)
  so that load from other users of the machine hits every row alike;
- tf.data: ``tfds.load`` of the same split + decode, Inception-style random crop with the same
  scale/ratio, resize, flip, normalise, batch, prefetch (printed in full with the results), with one
  thread and with AUTOTUNE. It runs in a subprocess: torch and TensorFlow in one process segfaulted
  here, so this process never imports TensorFlow. tf.data cannot read ``array_record``, so when the
  dataset has no ``tfrecord`` files the subprocess first copies the shards the split touches into a
  temporary ``tfrecord`` copy (the same serialized records), untimed;
- memory: RSS of this process plus its DataLoader worker processes after each of ``--epochs`` epochs
  of one loader with ``--memory-workers`` persistent workers; the goal is growth under 5% from the
  first epoch to the last.

By default the data is ``pf_digits/224`` (scikit-learn's digits upscaled to 224x224 RGB JPEG),
prepared into a temporary directory by ``python -m pf_sweep.data prepare`` in a subprocess, and each
epoch reads ``train[:1024]``. Timings on a shared 2-core machine are indicative only.

    .venv/bin/python benchmarks/data_throughput.py                     # defaults, about a minute on 2 cores
    .venv/bin/python benchmarks/data_throughput.py --skip-tf --timed-epochs 1 --epochs 2   # quick check
    .venv/bin/python benchmarks/data_throughput.py --dataset tfds/imagenet2012 --data-dir /data/tfds \\
        --split train --limit 8192 --workers 0,2,4 --memory-workers 4
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from pf_sweep.config import TrialConfig
from pf_sweep.data import get_source

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from pf_sweep.data.loader import ShardedSampler

# Only the standard library, psutil and pf_sweep's light modules load at import time: the tf.data
# subprocess runs this same file (``--tf-child``) and must never load torch; DataLoader workers
# (forkserver) import it too. The loader side loads torch and timm when it builds its first loader.

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = "tfds/pf_digits/224"
DEFAULT_LIMIT = 1024
MEMORY_GROWTH_GOAL = 5.0  # percent, first epoch -> last
SHUFFLE_BUFFER = 10_000  # tf.data shuffle buffer cap (encoded records); ours permutes the whole split
TF_REFERENCE = "tf.data AUTOTUNE"
MiB = 2**20
DECODER = "OpenCV" if importlib.util.find_spec("cv2") else "PIL"  # what TFDS's data source decodes images with


class _DropDecoderWarning(logging.Filter):
    """TFDS warns in every loader process that it decodes with PIL for want of OpenCV; the header says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropDecoderWarning())  # module level: forkserver workers import this file too


@dataclass
class Row:
    """One loader's timings: images/s of each timed epoch, and the seconds of its first (cold) epoch."""

    rates: list[float] = field(default_factory=list)
    cold_s: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


# --------------------------------------------------------------------------------------- data
def prepare_digits(name: str, data_dir: str) -> str:
    """Prepare a ``pf_digits`` config with the project's CLI, in a subprocess because preparing imports TensorFlow."""
    cmd = [sys.executable, "-m", "pf_sweep.data", "prepare", name, "--data-dir", data_dir]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"preparing {name} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def benchmark_split(split: str, limit: int | None) -> str:
    """``--split`` cut to ``--limit`` examples: a plain split name gets ``[:limit]``, a sliced one is taken as given."""
    if limit is None:
        limit = DEFAULT_LIMIT if _plain_split(split) else 0
    return f"{split}[:{limit}]" if limit else split


def _plain_split(split: str) -> bool:
    return re.fullmatch(r"[\w\-]+", split) is not None


def trial_config(args: argparse.Namespace, data_dir: str | None, split: str) -> TrialConfig:
    return TrialConfig(
        dataset=args.dataset, data_dir=data_dir, train_split=split, img_size=args.img_size, batch_size=args.batch, seed=args.seed
    )


def build_training_loader(cfg: TrialConfig, workers: int) -> tuple[DataLoader, ShardedSampler]:
    """The training loader of a one-worker trial, built as ``train.build_data`` builds it (``loader_workers=workers``)."""
    from pf_sweep.data.loader import ShardedSampler, TransformedSplit, build_loader  # torch: see the note on imports
    from pf_sweep.data.transforms import build_transform

    source = get_source(cfg.dataset)
    hints = {"img_size": cfg.img_size, "num_classes": cfg.num_classes}
    info = source.info(cfg.data_dir, **hints)
    dataset = TransformedSplit(
        source.split(cfg.train_split, cfg.data_dir, **hints), build_transform(cfg, info, training=True), cfg.seed
    )
    sampler = ShardedSampler(len(dataset), shuffle=True, seed=cfg.seed, batch_multiple=cfg.batch_size, with_epoch=True)
    if len(sampler) == 0:
        raise SystemExit(f"{cfg.dataset}:{cfg.train_split} has {len(dataset)} examples, fewer than one batch of {cfg.batch_size}")
    return build_loader(dataset, sampler, cfg.batch_size, workers=workers), sampler


def run_epoch(loader: DataLoader, sampler: ShardedSampler, epoch: int) -> tuple[int, float]:
    """(images, seconds) of one full pass, from asking for the first batch to holding the last."""
    sampler.set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch, _ in loader:
        images += batch.shape[0]
    return images, time.perf_counter() - start


# --------------------------------------------------------------------------------------- ours
def measure_ours(cfg: TrialConfig, workers: list[int], warmup: int, timed: int) -> dict[str, Row]:
    """images/s per worker count: each row's warmup epochs (the first timed as 'cold'), then timed epochs round-robin."""
    loaders = {f"ours W={w}": build_training_loader(cfg, w) for w in workers}
    rows = {label: Row() for label in loaders}
    for label, (loader, sampler) in loaders.items():
        for epoch in range(warmup):
            _, seconds = run_epoch(loader, sampler, epoch)
            if epoch == 0:
                rows[label].cold_s = seconds
    for epoch in range(warmup, warmup + timed):
        for label, (loader, sampler) in loaders.items():
            images, seconds = run_epoch(loader, sampler, epoch)
            rows[label].rates.append(images / seconds)
    del loaders
    gc.collect()  # shuts the persistent workers down before the next part
    return rows


def measure_memory(cfg: TrialConfig, workers: int, epochs: int) -> list[dict[str, float]]:
    """RSS (MiB) of this process and of the loader's worker processes after each epoch of one fresh loader."""
    loader, sampler = build_training_loader(cfg, workers)
    samples = []
    for epoch in range(epochs):
        images, seconds = run_epoch(loader, sampler, epoch)
        gc.collect()
        main = psutil.Process().memory_info().rss / MiB
        pids = _worker_pids(loader)
        worker_rss = sum(_rss(pid) for pid in pids) / MiB
        samples.append(
            {"main": main, "workers": worker_rss, "total": main + worker_rss, "rate": images / seconds, "n": len(pids)}
        )
    del loader
    gc.collect()
    return samples


def _worker_pids(loader: DataLoader) -> list[int]:
    """PIDs of a persistent-worker loader's processes (``_workers`` is torch's own list; the forkserver is not one of them)."""
    iterator = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", []) if w.pid is not None]


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


# --------------------------------------------------------------------------------------- tf.data (subprocess)
def tf_spec(cfg: TrialConfig, args: argparse.Namespace) -> dict[str, Any]:
    """What the tf.data subprocess needs: the split, its feature names, and our transform's resolved knobs."""
    from pf_sweep.data.transforms import resolved_options  # timm: see the note on imports

    source = get_source(cfg.dataset)
    info = source.info(cfg.data_dir, img_size=cfg.img_size)
    split = source.split(cfg.train_split, cfg.data_dir)
    opts = resolved_options(cfg, info)
    return {
        "name": cfg.dataset.removeprefix("tfds/"),
        "data_dir": cfg.data_dir,
        "split": cfg.train_split,
        "image_key": split.image_key,
        "label_key": split.label_key,
        "multi_label": split.label_width is not None,
        "batch": cfg.batch_size,
        "seed": cfg.seed,
        "warmup": args.warmup_epochs,
        "timed": args.timed_epochs,
        "in_chans": info.in_chans,
        "size": opts["input_size"][-1],
        "scale": list(opts["scale"]),
        "ratio": list(opts["ratio"]),
        "hflip": opts["hflip"],
        "mean": list(opts["mean"]),
        "std": list(opts["std"]),
        "interpolation": "bicubic" if opts["interpolation"] == "bicubic" else "bilinear",
    }


def describe_tf(spec: dict[str, Any]) -> str:
    flip = f"flip left-right with p={spec['hflip']} -> " if spec["hflip"] > 0 else ""
    return (
        f"tfds.load({spec['name']!r}, split={spec['split']!r}, shuffle_files unless ordered, image left encoded) -> "
        f"shuffle(min(examples, {SHUFFLE_BUFFER:,})) -> map[tf.io.decode_image({spec['in_chans']} channels) -> "
        f"sample_distorted_bounding_box(area {tuple(spec['scale'])}, aspect {tuple(spec['ratio'])}, 10 attempts, "
        f"else whole image) crop -> tf.image.resize {spec['size']}x{spec['size']} {spec['interpolation']} antialias=True "
        f"(PIL's resize antialiases too) -> {flip}/255, (x - mean) / std, HWC -> CHW float32] -> "
        f"batch({spec['batch']}, drop_remainder) -> prefetch(AUTOTUNE). "
        f"'1 thread': sequential map, private threadpool of 1, intra-op parallelism 1; "
        f"'AUTOTUNE': map(num_parallel_calls=AUTOTUNE), TensorFlow's default threading"
    )


def measure_tf(spec: dict[str, Any], workdir: str) -> tuple[dict[str, Row], str]:
    """Rows of the tf.data subprocess, and a note (TensorFlow version and data used, or why it failed)."""
    spec_path, out_path = Path(workdir, "tf_spec.json"), Path(workdir, "tf_out.json")
    spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tf-child", str(spec_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out_path.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        return {}, f"tf.data subprocess failed (exit {done.returncode}):\n{tail}"
    out = json.loads(out_path.read_text())
    rows = {label: Row(rates=r["rates"], cold_s=r["cold_s"]) for label, r in out["rows"].items()}
    return rows, out["note"]


def tf_child(spec_path: str) -> None:
    """The tf.data side, run in its own process (``--tf-child``): the only place TensorFlow is imported."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["multi_label"]:
        raise SystemExit(f"{spec['split']}: label sets (multi-label) are not batched by this tf.data pipeline")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    import pf_sweep.data.tfds_digits  # noqa: F401 - registers pf_digits, whose files the copy keeps

    tf.random.set_seed(spec["seed"])
    with tempfile.TemporaryDirectory(prefix="pf-data-throughput-tfrecord-") as scratch:
        start = time.perf_counter()
        data_dir, copied = _tfrecord_data_dir(spec, scratch)
        copy_s = time.perf_counter() - start
        pipelines = {
            "tf.data 1 thread": _tf_pipeline(spec, data_dir, parallel=False),
            TF_REFERENCE: _tf_pipeline(spec, data_dir, parallel=True),
        }
        rows: dict[str, dict[str, Any]] = {label: {"rates": [], "cold_s": float("nan")} for label in pipelines}
        for label, ds in pipelines.items():
            for epoch in range(spec["warmup"]):
                _, seconds = _tf_epoch(ds)
                if epoch == 0:
                    rows[label]["cold_s"] = seconds
        for _ in range(spec["timed"]):
            for label, ds in pipelines.items():
                images, seconds = _tf_epoch(ds)
                rows[label]["rates"].append(images / seconds)
    where = (
        f"a tfrecord copy of the {copied} shard(s) the split reads (made in {copy_s:.1f} s, untimed)"
        if copied
        else "its tfrecord files"
    )
    note = f"TensorFlow {tf.__version__}, tensorflow-datasets {tfds.__version__}; read from {where}"
    Path(spec["out"]).write_text(json.dumps({"rows": rows, "note": note}))


def _tfrecord_data_dir(spec: dict[str, Any], scratch: str) -> tuple[str | None, int]:
    """A data dir holding the split as tfrecord, and how many shards were copied into it (0: the dataset's own).

    array_record and tfrecord shards hold the same serialized examples, so whole shards are copied
    record by record beside the dataset's metadata files, whose ``dataset_info.json`` then names
    ``tfrecord`` as the format (TFDS derives the shard file names from it). Only the shards the
    split's file instructions touch are copied (``train[:1024]`` of ImageNet is one shard, not 140 GB).
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordReader
    from etils import epath
    from tensorflow_datasets.core import file_adapters

    builder = tfds.builder(spec["name"], data_dir=spec["data_dir"])
    if builder.info.file_format == file_adapters.FileFormat.TFRECORD:  # TFDS names the files it reads after this format
        return spec["data_dir"], 0
    source = epath.Path(builder.data_dir)
    target = Path(scratch, builder.info.full_name)
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and "-of-" not in path.name:  # metadata: dataset_info.json, features.json, label files
            (target / path.name).write_bytes(path.read_bytes())
    info_json = json.loads((target / "dataset_info.json").read_text())
    info_json["fileFormat"] = "tfrecord"
    info_json.pop("alternativeFileFormats", None)
    (target / "dataset_info.json").write_text(json.dumps(info_json))
    shards = {instruction.filename for instruction in builder.info.splits[spec["split"]].file_instructions}
    for shard in sorted(shards):
        name = file_adapters.convert_path_to_file_format(shard, file_adapters.FileFormat.TFRECORD).name
        reader = ArrayRecordReader(os.fspath(shard))
        with tf.io.TFRecordWriter(str(target / name)) as writer:
            for record in reader.read_all():
                writer.write(record)
        reader.close()
    return scratch, len(shards)


def _tf_pipeline(spec: dict[str, Any], data_dir: str | None, *, parallel: bool) -> Any:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    image_key, label_key = spec["image_key"], spec["label_key"]
    info = tfds.builder(spec["name"], data_dir=data_dir).info
    ds = tfds.load(
        spec["name"],
        split=spec["split"],
        data_dir=data_dir,
        download=False,
        shuffle_files=not info.disable_shuffling,  # TFDS refuses to shuffle an ordered dataset's files (pf_digits is one)
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(file_format="tfrecord", shuffle_seed=spec["seed"]),
    )
    examples = info.splits[spec["split"]].num_examples
    augment = _tf_augment(spec)
    ds = ds.shuffle(min(examples, SHUFFLE_BUFFER), seed=spec["seed"], reshuffle_each_iteration=True)
    ds = ds.map(lambda ex: (augment(ex[image_key]), ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE if parallel else None)
    ds = ds.batch(spec["batch"], drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    if not parallel:
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    return ds


def _tf_augment(spec: dict[str, Any]) -> Any:
    """Encoded image -> normalised CHW float32, the tf.data counterpart of timm's training transform (see ``describe_tf``)."""
    import tensorflow as tf

    size, hflip = spec["size"], spec["hflip"]
    mean, std = tf.constant(spec["mean"], tf.float32), tf.constant(spec["std"], tf.float32)

    def augment(encoded: Any) -> Any:
        image = tf.io.decode_image(encoded, channels=spec["in_chans"], expand_animations=False)
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image),
            tf.zeros([1, 0, 4], tf.float32),
            min_object_covered=0.0,
            aspect_ratio_range=spec["ratio"],
            area_range=spec["scale"],
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.image.resize(tf.slice(image, begin, crop), (size, size), method=spec["interpolation"], antialias=True)
        if hflip > 0:
            image = tf.cond(tf.random.uniform([]) < hflip, lambda: tf.image.flip_left_right(image), lambda: image)
        return tf.transpose((image / 255.0 - mean) / std, (2, 0, 1))

    return augment


def _tf_epoch(ds: Any) -> tuple[int, float]:
    images = 0
    start = time.perf_counter()
    for batch, _ in ds:
        images += int(batch.shape[0])
    return images, time.perf_counter() - start


# --------------------------------------------------------------------------------------- report
def print_table(rows: dict[str, Row], per_epoch: int) -> None:
    base = rows.get("ours W=0")
    ref = rows.get(TF_REFERENCE)
    print(f"\n  {'loader':<18} {'images/s':>9} {'x W=0':>7} {'x tf.data':>10} {'min-max images/s':>17} {'cold epoch s':>13}")
    for label, row in rows.items():
        vs_base = f"{row.median / base.median:.2f}" if base else "-"
        vs_ref = f"{row.median / ref.median:.2f}" if ref else "-"
        spread = f"{min(row.rates):.0f}-{max(row.rates):.0f}" if row.rates else "-"
        print(f"  {label:<18} {row.median:>9.1f} {vs_base:>7} {vs_ref:>10} {spread:>17} {row.cold_s:>13.1f}")
    print(
        f"  (median over timed epochs of {per_epoch} images; 'x tf.data' is against '{TF_REFERENCE}'; the cold epoch "
        "includes starting the loader's workers, or building and tracing the tf.data pipeline)"
    )


def print_memory(samples: list[dict[str, float]], workers: int) -> list[str]:
    """The per-epoch RSS table; returns the goal lines."""
    print(f"\nMemory: RSS after each epoch, one loader with {workers} persistent workers (forkserver process not counted)")
    print(f"  {'epoch':>5} {'main MiB':>9} {'workers MiB':>12} {'total MiB':>10} {'images/s':>9}")
    for epoch, s in enumerate(samples, start=1):
        print(f"  {epoch:>5} {s['main']:>9.1f} {s['workers']:>12.1f} {s['total']:>10.1f} {s['rate']:>9.1f}")
    first, last = samples[0], samples[-1]

    def growth(key: str) -> float:
        return (last[key] - first[key]) / first[key] * 100 if first[key] else float("nan")

    print(
        f"  growth epoch 1 -> {len(samples)}: total {growth('total'):+.2f}% "
        f"(main {growth('main'):+.2f}%, workers {growth('workers'):+.2f}%)"
    )
    total = growth("total")
    lines = [
        f"{'PASS' if total < MEMORY_GROWTH_GOAL else 'FAIL'}  RSS (main + {workers} workers) grows {total:+.2f}% "
        f"from epoch 1 to epoch {len(samples)} (goal < {MEMORY_GROWTH_GOAL:.0f}%)"
    ]
    if any(s["n"] != workers for s in samples):
        lines.append(f"FAIL  found {[int(s['n']) for s in samples]} worker processes per epoch, expected {workers}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help=f"a prepared tfds/<name> (default {DEFAULT_DATASET})")
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data dir (default: a temporary one for pf_digits, else TFDS's default)"
    )
    parser.add_argument("--split", default="train", help="split in TFDS syntax (default train)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"examples per epoch, as SPLIT[:LIMIT] (default {DEFAULT_LIMIT} for a plain split name, 0 = the whole split)",
    )
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--img-size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--workers", default="0,1,2", help="loading worker counts to compare (default 0,1,2)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs per loader first (default 1)")
    parser.add_argument("--timed-epochs", type=int, default=5, help="timed epochs per loader; the median is reported (default 5)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the memory part (default 5)")
    parser.add_argument("--memory-workers", type=int, default=2, help="loading workers of the memory part (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-tf", action="store_true", help="leave out the tf.data rows")
    parser.add_argument("--tf-child", default=None, help=argparse.SUPPRESS)  # internal: run the tf.data side
    args = parser.parse_args(argv)
    if args.tf_child:
        return args
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers must be a comma list of integers, got {args.workers!r}")
    if not args.workers or min(args.workers) < 0 or len(set(args.workers)) != len(args.workers):
        parser.error(f"--workers must list distinct worker counts >= 0, got {args.workers}")
    if not args.dataset.startswith("tfds/"):
        parser.error(f"--dataset must be a prepared tfds/<name> (tf.data reads only those), got {args.dataset!r}")
    if args.limit is not None and args.limit > 0 and not _plain_split(args.split):
        parser.error(
            f"--limit cuts a plain split name; --split {args.split!r} is sliced already: put the limit there, or pass --limit 0"
        )
    if args.batch < 1 or args.img_size < 1 or (args.limit or 0) < 0:
        parser.error("--batch and --img-size must be >= 1, --limit >= 0")
    if args.warmup_epochs < 1 or args.timed_epochs < 1 or args.epochs < 2 or args.memory_workers < 1:
        parser.error(
            "--warmup-epochs and --timed-epochs must be >= 1, --epochs >= 2 (growth from the first), --memory-workers >= 1"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tf_child:
        tf_child(args.tf_child)
        return
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-data-throughput-"))
        name = args.dataset.removeprefix("tfds/")
        data_dir = args.data_dir
        prepared = ""
        if name.split(":")[0].split("/")[0] == "pf_digits":
            data_dir = data_dir or str(Path(workdir, "data"))
            prepared = prepare_digits(name, data_dir)
        cfg = trial_config(args, data_dir, benchmark_split(args.split, args.limit))
        try:
            spec = tf_spec(cfg, args)  # also checks the dataset and split before anything is timed
        except (FileNotFoundError, ValueError) as err:  # not prepared (DatasetNotPreparedError), bad split
            raise SystemExit(f"data_throughput.py: error: {err}") from None

        import PIL
        import timm
        import torch

        print(
            f"Data throughput: {args.dataset}:{cfg.train_split}, data dir {data_dir or 'TFDS default'}; batch {cfg.batch_size}, "
            f"{spec['size']}x{spec['size']}; torch {torch.__version__} ({torch.get_num_threads()} threads in this process), "
            f"timm {timm.__version__}, Pillow {PIL.__version__}; {len(os.sched_getaffinity(0))} CPUs, "
            f"load average {os.getloadavg()[0]:.2f} at start"
        )
        if prepared:
            print(f"data: {prepared}")
        loader, sampler = build_training_loader(cfg, 0)
        per_epoch = len(sampler)
        print(f"ours: train.build_data's training loader; TFDS data source decodes with {DECODER}; transform (timm):")
        print("  " + repr(loader.dataset.transform).replace("\n", "\n  "))
        del loader, sampler

        print(f"[1/3] our loader, workers {args.workers}: {args.warmup_epochs} warmup + {args.timed_epochs} timed epochs each")
        rows = measure_ours(cfg, args.workers, args.warmup_epochs, args.timed_epochs)
        if args.skip_tf:
            print("[2/3] tf.data: skipped (--skip-tf)")
        else:
            print("[2/3] tf.data, in a subprocess: " + describe_tf(spec))
            tf_rows, note = measure_tf(spec, workdir)
            print(f"  {note}")
            rows.update(tf_rows)
        print(f"[3/3] memory: {args.epochs} epochs, {args.memory_workers} workers")
        samples = measure_memory(cfg, args.memory_workers, args.epochs)

        print_table(rows, per_epoch)
        goals = print_memory(samples, args.memory_workers)
    leaked = "tensorflow" in sys.modules
    goals.append(f"{'FAIL' if leaked else 'PASS'}  TensorFlow {'was' if leaked else 'was never'} imported in this process")
    print()
    print("\n".join(goals))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
