"""StoragePath: local directories and URIs behave alike for the small files pf-sweep writes itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf_sweep.storage import StoragePath, is_uri


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_read_exists_mkdir_on_paths_and_uris(tmp_path, as_uri):
    root = StoragePath.of(f"file://{tmp_path}" if as_uri else str(tmp_path))
    assert root.is_local is not as_uri
    sweep = root / "sweeps" / "s1"
    assert not sweep.exists()
    sweep.mkdir()
    (sweep / "sweep.json").write_text('{"a": 1}')
    assert (sweep / "sweep.json").exists()
    assert (sweep / "sweep.json").read_text() == '{"a": 1}'
    # Whatever the spelling, it is the same file on disk.
    assert (tmp_path / "sweeps" / "s1" / "sweep.json").read_text() == '{"a": 1}'
    assert sweep.name == "s1" and str(sweep.parent).endswith("sweeps")


def test_local_paths_become_absolute_and_uris_stay_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StoragePath.of("results").location == str(tmp_path / "results")
    assert StoragePath.of("s3://bucket/sweeps/").location == "s3://bucket/sweeps"
    assert str(StoragePath.of("gs://b/x") / "runs") == "gs://b/x/runs"
    assert is_uri("s3://b") and not is_uri(str(Path("/tmp")))
