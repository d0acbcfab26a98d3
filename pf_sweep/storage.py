"""Paths that are either local directories or URIs (``s3://``, ``gs://``, ``file://``...).

Ray stores sweeps and checkpoints through pyarrow filesystems; our own small files (``sweep.json``,
``summary.csv``, a trial's ``metrics.json``) go through the same filesystems, so a sweep on cloud
storage is as complete as a local one.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def is_uri(path: str) -> bool:
    return "://" in str(path)


@dataclass(frozen=True)
class StoragePath:
    """A location as Ray wants it: an absolute local path, or a URI left untouched."""

    location: str

    @classmethod
    def of(cls, path: str | Path) -> StoragePath:
        path = str(path)
        return cls(path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve()))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.location)

    def __truediv__(self, part: str) -> StoragePath:
        joined = posixpath.join(self.location, part) if not self.is_local else str(Path(self.location) / part)
        return StoragePath(joined)

    def __str__(self) -> str:
        return self.location

    @property
    def name(self) -> str:
        return posixpath.basename(self.location.rstrip("/"))

    @property
    def parent(self) -> StoragePath:
        if self.is_local:
            return StoragePath(str(Path(self.location).parent))
        return StoragePath(self.location.rstrip("/").rsplit("/", 1)[0])

    def filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path within it): what pyarrow's file calls want for a URI or a local path."""
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(self.location)

    def exists(self) -> bool:
        if self.is_local:
            return Path(self.location).exists()
        import pyarrow.fs

        fs, path = self.filesystem()
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def mkdir(self) -> None:
        if self.is_local:
            Path(self.location).mkdir(parents=True, exist_ok=True)
        else:
            fs, path = self.filesystem()
            fs.create_dir(path, recursive=True)

    def read_text(self) -> str:
        if self.is_local:
            return Path(self.location).read_text()
        fs, path = self.filesystem()
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, text: str) -> None:
        if self.is_local:
            Path(self.location).write_text(text)
            return
        fs, path = self.filesystem()
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
