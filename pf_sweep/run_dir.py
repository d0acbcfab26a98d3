"""A trial's run directory, ``runs/train-<trial id>/``: its ``checkpoint_<epoch>/`` folders.

Both ways a sweep runs a trial store checkpoints here under the same names: a Ray Train worker group
(Train uploads them) and a one-worker trial run inside its Tune trial actor (this module writes
them). A checkpoint is complete or absent: locally it is written under a hidden temporary name and
renamed into place, so a crash between its files never leaves a folder ``latest`` would pick. On a
URI (``s3://``, ``gs://``, ``file://``) the files are uploaded through pyarrow and a folder counts
only once all three files are there; ``state.pt`` goes last, under a temporary name moved into place
once its upload is whole. A hidden temporary folder left by a killed writer is removed by the next
write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pf_sweep.checkpoint import CONFIG_FILE, METRICS_FILE, STATE_FILE
from pf_sweep.storage import StoragePath

CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # the metric that tells Tune (and summary.csv) where a checkpoint is
_FILES = (STATE_FILE, CONFIG_FILE, METRICS_FILE)


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{int(epoch):06d}"


class RunDirectory:
    """Complete checkpoints of one trial, newest last; writes new ones and prunes old ones."""

    def __init__(self, location: str | Path | StoragePath) -> None:
        self.location = location if isinstance(location, StoragePath) else StoragePath.of(location)
        self._downloads: list[str] = []

    def _listing(self) -> dict[str, set[str]]:
        """{checkpoint folder name: the file names in it}."""
        if self.location.is_local:
            root = Path(self.location.location)
            if not root.is_dir():
                return {}
            return {p.name: {f.name for f in p.iterdir()} for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()}
        import pyarrow.fs

        fs, root = self.location.filesystem()
        if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
            return {}
        found: dict[str, set[str]] = {}
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
            parts = info.path[len(root) :].strip("/").split("/")
            if len(parts) == 2 and parts[0].startswith(CHECKPOINT_PREFIX):
                found.setdefault(parts[0], set()).add(parts[1])
        return found

    def checkpoints(self) -> list[str]:
        """Names of the complete checkpoints, oldest first (the names sort by epoch)."""
        return sorted(name for name, files in self._listing().items() if set(_FILES) <= files)

    def latest(self) -> str | None:
        """A local directory holding the newest complete checkpoint (a downloaded copy for a URI)."""
        names = self.checkpoints()
        if not names:
            return None
        source = self.location / names[-1]
        if self.location.is_local:
            return str(source)
        import pyarrow.fs

        local = tempfile.mkdtemp(prefix="pf-resume-")
        self._downloads.append(local)
        fs, path = source.filesystem()
        pyarrow.fs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        return local

    def write(self, epoch: int, write_fn: Callable[[Path], None]) -> str:
        """Write checkpoint ``epoch`` with ``write_fn(directory)``; returns where it now lives.

        Any error (a full disk, storage gone) propagates: the trial fails with it, and the previous
        checkpoints stay as they were.
        """
        name = checkpoint_name(epoch)
        target = self.location / name
        if self.location.is_local:
            root = Path(self.location.location)
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                write_fn(tmp)
                if Path(target.location).exists():  # the same epoch again, after a resume
                    shutil.rmtree(target.location)
                os.replace(tmp, target.location)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return target.location

        with tempfile.TemporaryDirectory(prefix="pf-ckpt-") as tmp:
            write_fn(Path(tmp))
            fs, path = target.filesystem()
            fs.create_dir(path, recursive=True)
            _upload(Path(tmp), fs, path)
        return target.location

    def prune(self, keep: int) -> None:
        """Delete all but the ``keep`` newest complete checkpoints (Ray Train's ``num_to_keep``)."""
        for name in self.checkpoints()[:-keep] if keep > 0 else []:
            old = self.location / name
            if self.location.is_local:
                shutil.rmtree(old.location, ignore_errors=True)
            else:
                fs, path = old.filesystem()
                fs.delete_dir(path)

    def cleanup(self) -> None:
        """Remove local copies made by ``latest`` for a URI run directory."""
        for path in self._downloads:
            shutil.rmtree(path, ignore_errors=True)
        self._downloads.clear()


def _remove_leftovers(root: Path) -> None:
    """Delete the hidden temporary folders of writes that a killed process never finished.

    One process writes a run directory at a time (a retry starts after the failed attempt died),
    so a temporary folder found here belongs to no live write.
    """
    for stale in root.glob(f".{CHECKPOINT_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _upload(local: Path, fs, path: str) -> None:
    """Copy a written checkpoint to ``path`` on ``fs``, ``state.pt`` last and under a temporary name.

    A folder counts as a checkpoint once it has all three files, so ``state.pt`` is the one that
    completes it: it is moved into place only after its upload has finished. An upload that fails
    half-way (a full disk, a dropped connection) then leaves a folder ``checkpoints`` ignores.
    """
    import pyarrow.fs

    local_fs = pyarrow.fs.LocalFileSystem()
    for file in sorted(local.iterdir(), key=lambda f: f.name == STATE_FILE):
        if file.name != STATE_FILE:
            pyarrow.fs.copy_files(str(file), f"{path}/{file.name}", source_filesystem=local_fs, destination_filesystem=fs)
            continue
        partial = f"{path}/{STATE_FILE}.partial"
        pyarrow.fs.copy_files(str(file), partial, source_filesystem=local_fs, destination_filesystem=fs)
        fs.move(partial, f"{path}/{STATE_FILE}")
