"""search_spaces.get on a user's file: its Optuna ``suggest`` survives the plain pickle Tune saves it with."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import search_spaces

ROOT = Path(__file__).resolve().parents[1]

USER_SPACE = """
from search_spaces.base import SearchSpace


def suggest(trial):
    trial.suggest_float("lr", 0.01, 0.1, log=True)


SPACE = SearchSpace(name="mine", description="a user's space", base={"epochs": 1}, suggest=suggest)
"""


def test_a_space_file_suggest_pickles_and_unpickles_in_a_process_that_loaded_the_same_file(tmp_path):
    path = tmp_path / "my_space.py"
    path.write_text(USER_SPACE)
    space = search_spaces.get(str(path))
    blob = pickle.dumps(space.suggest)  # what Tune's OptunaSearch.save does with the searcher's state
    assert pickle.loads(blob) is space.suggest
    # A resuming driver: a new process that loads the same file first, then restores the state.
    (tmp_path / "state.pkl").write_bytes(blob)
    code = (
        "import pickle, sys, search_spaces\n"
        f"search_spaces.get({str(path)!r})\n"
        f"fn = pickle.loads(open({str(tmp_path / 'state.pkl')!r}, 'rb').read())\n"
        "print(fn.__name__, fn.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "suggest" and proc.stdout.split()[1].startswith("user_space_my_space_")


def test_two_space_files_with_the_same_name_do_not_shadow_each_other(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "space.py").write_text(USER_SPACE)
    (tmp_path / "b" / "space.py").write_text(USER_SPACE.replace('"mine"', '"other"'))
    first = search_spaces.get(str(tmp_path / "a" / "space.py"))
    second = search_spaces.get(str(tmp_path / "b" / "space.py"))
    assert (first.name, second.name) == ("mine", "other")
    assert first.suggest.__module__ != second.suggest.__module__
    assert pickle.loads(pickle.dumps(first.suggest)) is first.suggest


def test_a_resumed_sweep_imports_the_space_file_its_pickled_searcher_names(tmp_path):
    from pf_sweep.sweep import _suggest_module

    path = tmp_path / "my_space.py"
    path.write_text(USER_SPACE)
    space = search_spaces.get(str(path))
    source = _suggest_module(space)  # what launch() stores in sweep.json
    assert source == {"name": space.suggest.__module__, "file": str(path.resolve())}
    assert _suggest_module(search_spaces.get("digits_cpu"))["name"] == "search_spaces.digits_cpu"
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(space.suggest))
    code = (  # a resuming driver that was given no --space: only sweep.json's record
        "import json, pickle, sys\n"
        "from pf_sweep.storage import StoragePath\n"
        "from pf_sweep.sweep import _import_suggest_module\n"
        f"_import_suggest_module(json.loads(sys.argv[1]), StoragePath.of({str(tmp_path)!r}))\n"
        f"print(pickle.loads(open({str(tmp_path / 'state.pkl')!r}, 'rb').read()).__name__)\n"
    )
    run = [sys.executable, "-c", code, json.dumps(source)]
    proc = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "suggest", proc.stderr
    path.unlink()
    proc = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "its space file" in proc.stderr and "is gone" in proc.stderr


def _conditional(trial):
    method = trial.suggest_categorical("method", ["sgd", "sam"])
    if method == "sam":
        perturbation = trial.suggest_categorical("perturbation", ["max", "obf"])
        if perturbation == "obf":
            trial.suggest_float("obf_gamma", 0.5, 1.0)
    return {"seed": 1}


def test_searched_fields_are_every_branchs_fields_a_grids_keys_and_none_for_named_runs():
    from search_spaces.base import SearchSpace

    suggest = SearchSpace(name="s", description="", base={}, suggest=_conditional, points_to_evaluate=({"lr": 0.1},))
    # obf_gamma is set by one proposal in four: the probes must reach it; constants count too
    assert suggest.searched_fields() == {"method", "perturbation", "obf_gamma", "seed", "lr"}
    grid = SearchSpace(name="g", description="", base={}, grid={"rho": [0.1, 0.2], "seed": [0, 1]})
    assert grid.searched_fields() == {"rho", "seed"}
    runs = SearchSpace(name="p", description="", base={}, points={"a": {"rho": 0.1}})
    assert runs.searched_fields() == set()
    shipped = search_spaces.get("digits_cpu").searched_fields()
    assert {"rho", "lr", "sharpness_m", "obf_gamma"} <= shipped and not {"epochs", "model", "dataset"} & shipped
