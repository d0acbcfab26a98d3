"""``python -m pf_sweep.data prepare | convert | info``: TFDS datasets made ready for ``tfds/<name>``.

Preparing writes ``array_record`` files, the format ``tfds.data_source`` reads by random access.
Most TFDS builders need TensorFlow to prepare (the ``prepare`` extra); reading never does. Because
torch and TensorFlow in one process segfaulted here, preparing always runs as its own command.

``--module`` imports a Python module by dotted name (the current directory is on the path) before
building, so a ``tfds.core.GeneratorBasedBuilder`` defined there is registered with TFDS under its
snake-case name. TFDS looks up a builder's resources by package, so on Python 3.11 the module must
sit inside a package (``my_datasets/toy.py`` -> ``--module my_datasets.toy``). pf-sweep's own
builders (``pf_digits``) are always registered.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import file_adapters

from pf_sweep.data.tfds_source import ARRAY_RECORD, command, file_formats

OWN_BUILDERS = ("pf_sweep.data.tfds_digits",)
PREPARE_EXTRA = "pip install -e '.[prepare]'"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        for module in (*OWN_BUILDERS, *args.module):
            register_builders(module)
        args.run(args)
    except UsageError as err:
        print(f"pf_sweep.data {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pf_sweep.data", description="Make TFDS datasets ready for tfds/<name>.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, help_text in (
        ("prepare", prepare, "download and prepare NAME as array_record (converts an existing tfrecord copy instead)"),
        ("convert", convert, "convert NAME, prepared as tfrecord, to array_record in place"),
        ("info", info, "print NAME's splits, sizes, features and file formats"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("name", help="TFDS name, optionally with config and version: imagenet2012, pf_digits/224:1.0.0")
        sub.add_argument(
            "--data-dir",
            default=None,
            help="TFDS data dir, local or a cloud URI (default: TFDS_DATA_DIR or ~/tensorflow_datasets)",
        )
        sub.add_argument(
            "--module",
            action="append",
            default=[],
            help="import this module (dotted name) first, to register the builder it defines",
        )
        if name == "prepare":
            sub.add_argument("--manual-dir", default=None, help="folder holding manually downloaded files (ImageNet's tars)")
        sub.set_defaults(run=run)
    return parser


def register_builders(module: str) -> None:
    """Import a module by dotted name, registering the TFDS builders it defines."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise UsageError(f"cannot import --module {module}: {err}") from None


def builder(name: str, data_dir: str | None) -> Any:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise UsageError(f"no TFDS dataset named {name!r}; pass --module with the module that defines its builder") from None


def prepare(args: argparse.Namespace) -> None:
    b = builder(args.name, args.data_dir)
    if b.is_prepared():
        if ARRAY_RECORD in file_formats(b.info):
            print(f"{args.name} is already prepared as array_record at {b.data_dir}")
            return
        _convert(b)
        return
    manual_dir = _manual_dir(b, args.manual_dir)
    with _needs_tensorflow():
        b.download_and_prepare(file_format=ARRAY_RECORD, download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    print(f"prepared {args.name} as array_record at {b.data_dir}")


def _manual_dir(b: Any, manual_dir: str | None) -> str | None:
    """Check up front that a manual-download dataset has its files, rather than fail mid-build."""
    if not b.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return manual_dir
    folder = epath.Path(manual_dir) if manual_dir else epath.Path(b.data_dir_root) / "downloads" / "manual"
    if not folder.exists() or not any(folder.iterdir()):
        instructions = " ".join(b.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        raise UsageError(f"{b.name} needs files you download yourself into --manual-dir (now {folder}, empty): {instructions}")
    return str(folder)


def convert(args: argparse.Namespace) -> None:
    b = builder(args.name, args.data_dir)
    if not b.is_prepared():
        raise UsageError(
            f"{args.name} is not prepared at {b.data_dir}; prepare it with: {command('prepare', args.name, args.data_dir)}"
        )
    if ARRAY_RECORD in file_formats(b.info):
        print(f"{args.name} already has array_record files at {b.data_dir}")
        return
    _convert(b)


def _convert(b: Any) -> None:
    """Rewrite every shard as array_record beside the old one, then list the format in dataset_info.json.

    Built from TFDS's own file adapters: its converter module (``scripts/cli/convert_format_utils``)
    cannot be imported without Apache Beam, even for a single-process conversion.
    """
    dataset_info = b.info
    reader = file_adapters.ADAPTER_FOR_FORMAT[dataset_info.file_format]
    writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat(ARRAY_RECORD)]
    with _needs_tensorflow():  # reading tfrecord goes through tf.data
        for split in dataset_info.splits.values():
            for path in split.filepaths:
                target = file_adapters.convert_path_to_file_format(path, file_adapters.FileFormat(ARRAY_RECORD))
                partial = target.with_name(target.name + ".incomplete")
                records = reader.make_tf_data(path)  # before the writer opens a file: TensorFlow may be missing
                writer.write_examples(partial, ((i, record.numpy()) for i, record in enumerate(records)))
                partial.replace(target)
    dataset_info.add_alternative_file_format(file_adapters.FileFormat(ARRAY_RECORD))
    dataset_info.write_dataset_info_json(b.data_dir)
    print(f"converted {b.name} at {b.data_dir} to array_record (the {dataset_info.file_format.value} files stay)")


def info(args: argparse.Namespace) -> None:
    b = builder(args.name, args.data_dir)
    prepared = b.is_prepared()
    print(f"name:     {b.info.full_name}")
    print(f"data dir: {b.data_dir}")
    if prepared:
        print(f"formats:  {', '.join(sorted(file_formats(b.info)))}")
        print("splits:")
        for split in b.info.splits.values():
            sizes = f"{split.num_examples:>10,} examples  {split.num_shards:>4} shards  {split.num_bytes:>14,} bytes"
            print(f"  {split.name:<12} {sizes}")
    else:
        print(f"prepared: no (prepare it with: {command('prepare', args.name, args.data_dir)})")
    print(f"supervised keys: {b.info.supervised_keys}")
    print(f"features: {b.info.features}")


@contextlib.contextmanager
def _needs_tensorflow() -> Iterator[None]:
    """Turn a missing TensorFlow (however deep TFDS imported it) into one message naming the extra."""
    try:
        yield
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, ModuleNotFoundError) and (cause.name or "").split(".")[0] == "tensorflow":
                raise UsageError(f"this needs TensorFlow, which is not installed: {PREPARE_EXTRA}") from None
            cause = cause.__cause__ or cause.__context__
        raise
