"""Tune state files torn by a killed driver are put back from Tune's staged copies, or refused clearly."""

import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from pf_sweep.storage import StoragePath
from pf_sweep.tune_state import is_complete, mend_torn_state

SESSION, OLDER = "2026-12-04_10-00-05", "2026-12-03_09-00-00"


def _state(n_trials: int) -> bytes:
    return json.dumps({"trial_data": [[{"trial_id": f"t{i}"}, {}] for i in range(n_trials)], "runner_data": {}}).encode()


def _searcher(n_trials: int) -> bytes:
    return pickle.dumps({"trials": list(range(n_trials))}, protocol=5)


def _stage(temp_root, name, files, stamp="2026-12-04_10-00-05", ray_session="session_2026-12-04_10-00-01_1_42"):
    staged = temp_root / ray_session / "artifacts" / stamp / name / "driver_artifacts"
    (staged / "trial-abc").mkdir(parents=True)  # trial staging folders sit beside the files
    for file_name, data in files.items():
        (staged / file_name).write_bytes(data)
    return staged


@pytest.fixture(params=["path", "file-uri"])
def sweep(tmp_path, request):
    """A sweep dir as a killed driver left it: the newest session's experiment state cut short."""
    sweep_dir = tmp_path / "store" / "s"
    sweep_dir.mkdir(parents=True)
    files = {
        f"experiment_state-{OLDER}.json": _state(2),
        f"searcher-state-{OLDER}.pkl": _searcher(2),
        f"experiment_state-{SESSION}.json": _state(5)[:40],  # the copy the kill interrupted
        f"searcher-state-{SESSION}.pkl": _searcher(4),  # copied whole, one save older than the staged one
        "sweep.json": b"{}",
    }
    for name, data in files.items():
        (sweep_dir / name).write_bytes(data)
    where = str(sweep_dir) if request.param == "path" else f"file://{sweep_dir}"
    return StoragePath.of(where), sweep_dir, files


def test_complete_json_and_pickles_are_told_from_cut_ones_without_unpickling():
    state, searcher = _state(3), _searcher(3)
    assert is_complete(state) and is_complete(searcher)
    assert is_complete(pickle.dumps([1, 2], protocol=2))
    for cut in (state[:-1], searcher[:-1], searcher[: len(searcher) // 2], b""):
        assert not is_complete(cut)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    assert is_complete(pickle.dumps(Boom()))  # read opcode by opcode: nothing ran


def test_a_torn_state_is_replaced_by_the_staged_set_of_its_session(sweep, tmp_path, caplog):
    where, sweep_dir, files = sweep
    temp_root = tmp_path / "ray"
    staged = {f"experiment_state-{SESSION}.json": _state(5), f"searcher-state-{SESSION}.pkl": _searcher(5)}
    _stage(temp_root, "s", {name: data[:10] for name, data in staged.items()}, ray_session="session_old_1")  # also torn
    staging = _stage(temp_root, "s", staged)
    # An older staging of another sweep with the same session stamp must not be taken.
    _stage(temp_root, "other", {f"experiment_state-{SESSION}.json": _state(9)}, ray_session="session_x")

    with caplog.at_level(logging.WARNING, logger="pf_sweep.tune_state"):
        mended = mend_torn_state(where, temp_root=temp_root)

    assert mended == sorted(staged)
    for name, data in staged.items():
        assert (sweep_dir / name).read_bytes() == data  # the searcher too, so both come from one save
    for name in (f"experiment_state-{OLDER}.json", f"searcher-state-{OLDER}.pkl", "sweep.json"):
        assert (sweep_dir / name).read_bytes() == files[name]
    assert not list(sweep_dir.glob(".*mending")), "the atomic write left its temporary file"
    assert f"experiment_state-{SESSION}.json" in caplog.text and str(staging) in caplog.text
    assert mend_torn_state(where, temp_root=temp_root) == []  # mended once; a second look finds nothing


def test_an_intact_state_is_left_as_it_is_even_when_the_staging_differs(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / f"experiment_state-{SESSION}.json").write_bytes(_state(2))
    _stage(tmp_path / "ray", "s", {f"experiment_state-{SESSION}.json": _state(7)})
    assert mend_torn_state(StoragePath.of(sweep_dir), temp_root=tmp_path / "ray") == []
    assert (sweep_dir / f"experiment_state-{SESSION}.json").read_bytes() == _state(2)
    assert mend_torn_state(StoragePath.of(tmp_path / "empty"), temp_root=tmp_path / "ray") == []  # no state at all


def test_a_torn_state_without_a_whole_staged_copy_is_refused_with_what_to_do(sweep, tmp_path):
    where, sweep_dir, files = sweep
    temp_root = tmp_path / "ray"
    with pytest.raises(ValueError) as none_staged:
        mend_torn_state(where, temp_root=temp_root)
    message = str(none_staged.value)
    assert f"experiment_state-{SESSION}.json" in message and "incomplete" in message
    assert f"-{SESSION}.json" in message and "previous session" in message
    # Staged, but the staged searcher is torn: the set is not taken, and nothing in the sweep changes.
    _stage(temp_root, "s", {f"experiment_state-{SESSION}.json": _state(5), f"searcher-state-{SESSION}.pkl": b"\x80\x05\x95"})
    with pytest.raises(ValueError, match="incomplete"):
        mend_torn_state(where, temp_root=temp_root)
    for name, data in files.items():
        assert (sweep_dir / name).read_bytes() == data


def test_a_torn_tuner_state_is_refused_as_nothing_to_resume(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {}})[:-3])
    (sweep_dir / f"experiment_state-{SESSION}.json").write_bytes(_state(1))
    with pytest.raises(ValueError, match=r"tuner.pkl in .* is incomplete.*launch the sweep again"):
        mend_torn_state(StoragePath.of(sweep_dir), temp_root=tmp_path / "ray")
    (sweep_dir / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {}}))
    assert mend_torn_state(StoragePath.of(sweep_dir), temp_root=tmp_path / "ray") == []


def test_each_kind_is_checked_as_tune_picks_it_and_hidden_temp_files_are_not_staged_state(tmp_path):
    # A resumed driver (session NEWER) killed in its first copy: its searcher state arrived torn, its
    # experiment state not at all. Tune would read searcher-state-NEWER.pkl; the staged NEWER set
    # goes back, and a half-written temporary file of Tune's in the staging folder is no part of it.
    newer = "2026-12-05_08-00-00"
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / f"experiment_state-{SESSION}.json").write_bytes(_state(2))
    (sweep_dir / f"searcher-state-{SESSION}.pkl").write_bytes(_searcher(2))
    (sweep_dir / f"searcher-state-{newer}.pkl").write_bytes(_searcher(3)[:20])
    staged = {f"experiment_state-{newer}.json": _state(3), f"searcher-state-{newer}.pkl": _searcher(3)}
    staging = _stage(tmp_path / "ray", "s", {**staged, f".1234-tmp-searcher-state-{newer}.pkl": b"\x80\x05"}, stamp=newer)
    assert mend_torn_state(StoragePath.of(sweep_dir), temp_root=tmp_path / "ray") == sorted(staged)
    for name, data in staged.items():
        assert (sweep_dir / name).read_bytes() == data
    assert not (sweep_dir / f".1234-tmp-searcher-state-{newer}.pkl").exists()
    assert (staging / f".1234-tmp-searcher-state-{newer}.pkl").exists()


def test_the_newest_own_staging_is_taken_and_a_symlinked_file_never(sweep, tmp_path):
    where, sweep_dir, _ = sweep
    temp_root = tmp_path / "ray"
    name = f"experiment_state-{SESSION}.json"
    old = _stage(temp_root, "s", {name: _state(3)}, ray_session="session_a")
    new = _stage(temp_root, "s", {name: _state(5)}, ray_session="session_b")
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))
    mend_torn_state(where, temp_root=temp_root)
    assert (sweep_dir / name).read_bytes() == _state(5)

    (sweep_dir / name).write_bytes(b"{")  # torn again; now the only staged copy is a link
    linked = tmp_path / "elsewhere.json"
    linked.write_bytes(_state(9))
    for staged in (old, new):
        (staged / name).unlink()
    (new / name).symlink_to(linked)
    with pytest.raises(ValueError, match="no complete staged copy"):
        mend_torn_state(where, temp_root=temp_root)


def test_rays_temp_root_follows_ray(monkeypatch):
    from pf_sweep import tune_state

    monkeypatch.setenv("TMPDIR", "/var/tmpdir")
    monkeypatch.setenv("RAY_TMPDIR", "/scratch")
    assert tune_state.ray_temp_root() == Path("/scratch/ray")
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.setattr(tune_state.sys, "platform", "linux")
    assert tune_state.ray_temp_root() == Path("/var/tmpdir/ray")
    monkeypatch.setattr(tune_state.sys, "platform", "darwin")  # macOS always sets TMPDIR; Ray ignores it there
    assert tune_state.ray_temp_root() == Path("/tmp/ray")
