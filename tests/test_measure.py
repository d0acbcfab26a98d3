"""analysis.measure: every checkpoint of a real sweep measured on Ray, checked against the analysis
functions called here on ``load_measurable``, with its cache and its failures.

The sweep is made once for the module through the CLI: a grid of three training splits, each trial
in its Tune actor (the default executor; a worker group's checkpoints have the same layout, see
tests/test_executors.py, and two ranks' example records merge in tests/test_example_forgetting.py)
with the example record on; the third split (8 examples, fewer than one batch) fails at run time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import analysis.measure as measure
from analysis import forgetting, hessian, sharpness
from analysis.checkpoints import load_measurable
from analysis.results import load_history, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ["train[:256]", "train[:320]", "train[:8]"]
FAILING_SPLIT = "train[:8]"
SPACE = f"""
from dataclasses import replace

from search_spaces.digits_cpu import SPACE as DIGITS

SPACE = replace(DIGITS, name="measure_grid", suggest=None, points_to_evaluate=(), grid={{"train_split": {SPLITS!r}}})
"""
SWEEP_ARGS = ["--max-failures", "0"]
SETS = {"epochs": "2", "batch_size": "32", "train_eval_size": "64", "record_examples": "true"}
# What the module measures: two rhos of one grid, the first 128 training images in batches of 64.
MEASURES = ["hessian_top", "worst_case_linf_adaptive", "forgetting"]
RHOS = [0.001, 0.002]
TERMS = {"data": "train[:128]", "m": 64, "batch_size": 64}


def _cache_files(sweep: Path) -> list[Path]:
    return sorted((sweep / measure.CACHE_DIR).glob("*/*.json"))


def _entries(sweep: Path) -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in _cache_files(sweep)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("measure-store")
    (storage / "space.py").write_text(SPACE)
    sets = [arg for name, value in SETS.items() for arg in ("--set", f"{name}={value}")]
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), "--name", "grid", "--space", "space.py"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*cmd, *SWEEP_ARGS, *sets], capture_output=True, text=True, timeout=400, env=env, cwd=storage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "grid"


@pytest.fixture(scope="module")
def trials(sweep) -> pd.DataFrame:
    frame = load_sweep(sweep).set_index("train_split")
    assert sorted(frame["status"]) == ["ERROR", "TERMINATED", "TERMINATED"]
    assert set(frame["num_workers"]) == {1}
    return frame


@pytest.fixture(scope="module")
def ray_session(sweep):
    """One small local Ray for the module, started after the sweep's own Ray is gone."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def first(sweep, trials, ray_session) -> tuple[pd.DataFrame, dict]:
    """The first measurement of the sweep, before any cache entry exists."""
    assert not _cache_files(sweep)
    return measure.measure_sweep(sweep, measures=MEASURES, rho_eval=RHOS, progress=False, return_stats=True, **TERMS)


def _forgetting_expected(sweep: Path, trial_id: str, checkpoint: str) -> dict[str, float]:
    history = load_history(sweep)
    expected = forgetting.summarize(history[history["trial_id"] == trial_id])
    counts = forgetting.forgetting_counts(forgetting.load_record(checkpoint))
    return {**expected, **{f"examples/{k}": v for k, v in counts.items()}}


# ------------------------------------------------------------------------------ before any Ray


@pytest.fixture
def no_ray_work(monkeypatch):
    """Any attempt to start Ray or submit a task fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray work started")

    monkeypatch.setattr(measure, "_run", refuse)
    monkeypatch.setattr("pf_sweep.trial.ensure_ray", refuse)


def test_import_pulls_in_neither_torch_nor_ray():
    code = "import sys, analysis.measure; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_an_unknown_measure_is_refused_naming_the_known_ones(tmp_path, no_ray_work):
    with pytest.raises(ValueError, match=r"unknown 'hessian_max'; known: hessian_top, .*worst_case_linf_adaptive.*forgetting"):
        measure.measure_sweep(tmp_path, measures=["hessian_top", "hessian_max"], rho_eval=RHOS)


def test_a_rho_measure_with_an_empty_grid_is_refused(tmp_path, no_ray_work):
    with pytest.raises(ValueError, match=r"rho_eval: empty, but these measures take rho: sam_sharpness;"):
        measure.measure_sweep(tmp_path, measures=["hessian_top", "sam_sharpness"], rho_eval=[])
    with pytest.raises(ValueError, match=r"rho_eval: -0\.1 is not a positive finite number"):
        measure.measure_sweep(tmp_path, measures=["sam_sharpness"], rho_eval=[0.1, -0.1])


def test_a_directory_that_is_not_a_sweep_is_refused(tmp_path, no_ray_work):
    with pytest.raises(ValueError, match=r"No sweep at .*: it has no sweep\.json"):
        measure.measure_sweep(tmp_path, measures=["hessian_top"])


def test_wide_names_one_column_per_measure_setting():
    long = pd.DataFrame(
        [
            ("s", "a", "hessian_top", math.nan, "value", 1.0),
            ("s", "a", "worst_case_l2", 0.5, "value", 2.0),
            ("s", "a", "hessian_trace", math.nan, "stderr", 3.0),
            ("s", "b", "forgetting", math.nan, "forget/kl/mean", 4.0),
            ("s", "b", "forgetting", math.nan, None, math.nan),  # a failed forgetting task
        ],
        columns=["sweep", "trial_id", "measure", "rho", "statistic", "value"],
    )
    table = measure.wide(long)
    assert list(table.columns) == [
        "sweep",
        "trial_id",
        "hessian_top",
        "worst_case_l2@rho=0.5",
        "hessian_trace/stderr",
        "forget/kl/mean",
    ]
    assert table["trial_id"].tolist() == ["a", "b"]
    assert table.iloc[0, 2:5].tolist() == [1.0, 2.0, 3.0] and math.isnan(table.iloc[0, 5])
    assert table.iloc[1, 5] == 4.0 and table.iloc[1, 2:5].isna().all()


def test_a_gpu_trial_gets_a_gpu_and_cuda_for_model_measures_only():
    submitted = []

    class Remote:  # records what a Ray remote function would be asked for
        def options(self, **options):
            submitted.append(options)
            return self

        def remote(self, *args):
            submitted[-1]["device"] = args[-1]

    options = measure.Options(data="train[:64]", m=64, batch_size=64, seed=0)
    for use_gpu in (True, False):
        for name in ("worst_case_l2", "forgetting"):
            trial = {"trial_id": "t", "checkpoint": "/x/checkpoint_000001", "use_gpu": use_gpu}
            measure._submit(
                Remote(), measure._Job(trial=trial, measure=measure.MEASURES[name], rhos=[0.1], missing=[0.1]), options, None
            )
    assert [(s["num_cpus"], s["num_gpus"], s["device"]) for s in submitted] == [
        (1, 1, "cuda"),
        (1, 0, "cpu"),
        (1, 0, "cpu"),
        (1, 0, "cpu"),
    ]


def test_the_cache_key_changes_with_every_setting_but_not_with_the_checkpoint_location():
    options = measure.Options(data="train[:64]", m=64, batch_size=64, seed=0)
    wc = measure.MEASURES["worst_case_linf"]
    base = measure.cache_key("/a/checkpoint_000003", wc.name, measure.settings_of(wc, options, 0.1))
    assert base == measure.cache_key("/copy/elsewhere/checkpoint_000003", wc.name, measure.settings_of(wc, options, 0.1))
    changed = [
        measure.cache_key("/a/checkpoint_000004", wc.name, measure.settings_of(wc, options, 0.1)),
        measure.cache_key("/a/checkpoint_000003", "worst_case_l2", measure.settings_of(wc, options, 0.1)),
        measure.cache_key("/a/checkpoint_000003", wc.name, measure.settings_of(wc, options, 0.2)),
    ]
    for name, value in (("data", "train[:128]"), ("m", 32), ("batch_size", 32), ("seed", 1)):
        other = measure.Options(**{**options.__dict__, name: value})
        changed.append(measure.cache_key("/a/checkpoint_000003", wc.name, measure.settings_of(wc, other, 0.1)))
    assert len({base, *changed}) == 1 + len(changed)
    # sam_sharpness is deterministic (no seed) and average_case uses no m: neither key moves with them.
    sam, avg = measure.MEASURES["sam_sharpness"], measure.MEASURES["average_case"]
    reseeded, resized = measure.Options(**{**options.__dict__, "seed": 5}), measure.Options(**{**options.__dict__, "m": 8})
    assert measure.settings_of(sam, options, 0.1) == measure.settings_of(sam, reseeded, 0.1)
    assert measure.settings_of(avg, options, 0.1) == measure.settings_of(avg, resized, 0.1)


# ------------------------------------------------------------------------------ on Ray


@pytest.mark.ray
@pytest.mark.slow
def test_one_row_per_terminated_trial_and_measure_setting_with_finite_values(sweep, trials, first):
    df, stats = first
    done = trials[trials["status"] == "TERMINATED"]
    assert stats == {"submitted": len(done) * len(MEASURES), "cached": 0, "failed": 0}
    assert list(df.columns) == measure.COLUMNS
    assert sorted(df["trial_id"].unique()) == sorted(done["trial_id"])
    for _, trial in done.iterrows():
        rows = df[df["trial_id"] == trial["trial_id"]]
        assert set(rows["checkpoint"]) == {trial["checkpoint"]} and set(rows["sweep"]) == {"grid"}
        assert len(rows[rows["measure"] == "hessian_top"]) == 1
        assert sorted(rows.loc[rows["measure"] == "worst_case_linf_adaptive", "rho"]) == RHOS
        expected = _forgetting_expected(sweep, trial["trial_id"], trial["checkpoint"])
        assert sorted(rows.loc[rows["measure"] == "forgetting", "statistic"]) == sorted(expected)
    assert df["value"].map(math.isfinite).all() and df["error"].isna().all() and (df["seconds"] >= 0).all()
    # Joinable with load_sweep, one row per trial.
    merged = load_sweep(sweep).merge(measure.wide(df), on=["sweep", "trial_id"])
    assert len(merged) == len(done) and "worst_case_linf_adaptive@rho=0.002" in merged and "hessian_top" in merged


@pytest.mark.ray
@pytest.mark.slow
def test_values_equal_the_analysis_functions_on_load_measurable(sweep, trials, first):
    df, _ = first
    trial = trials.loc["train[:320]"]
    got = measure.wide(df).set_index("trial_id").loc[trial["trial_id"]]
    ms = load_measurable(trial["checkpoint"], split="train[:128]", n=128, batch_size=64)
    assert sum(len(x) for x, _ in ms.data) == 128
    top = hessian.top_eigenvalues(ms.model, ms.loss_fn, ms.data, k=1, seed=0)[0]
    assert got["hessian_top"] == pytest.approx(top, rel=1e-5)  # float32 Lanczos in another process
    for rho in RHOS:
        worst = sharpness.worst_case(ms.model, ms.loss_fn, ms.data, rho=rho, m=64, adaptive=True, norm="linf", seed=0)
        assert got[f"worst_case_linf_adaptive@rho={rho}"] == pytest.approx(worst, rel=1e-6)
    # The shared grid, not the trial's own training rho.
    trained = sharpness.worst_case(ms.model, ms.loss_fn, ms.data, rho=trial["rho"], m=64, adaptive=True, norm="linf", seed=0)
    assert trial["rho"] not in RHOS and got[f"worst_case_linf_adaptive@rho={RHOS[1]}"] != pytest.approx(trained, rel=1e-3)
    expected = _forgetting_expected(sweep, trial["trial_id"], trial["checkpoint"])
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name


@pytest.mark.ray
@pytest.mark.slow
def test_every_registered_measure_equals_its_analysis_function(sweep, trials, ray_session):
    trial = trials.loc["train[:256]"]
    rho, terms = 0.01, {"data": "train[:32]", "m": 16, "batch_size": 16, "seed": 3}
    df = measure.measure_sweep(
        sweep, measures=measure.names(), rho_eval=[rho], trial_ids=[trial["trial_id"]], progress=False, **terms
    )
    got = df.set_index(["measure", "statistic"])["value"]
    ms = load_measurable(trial["checkpoint"], split="train[:32]", n=32, batch_size=16)
    args, seed = (ms.model, ms.loss_fn, ms.data), 3
    trace, stderr = hessian.trace(*args, seed=seed)
    expected = {
        ("hessian_top", "value"): hessian.top_eigenvalues(*args, k=1, seed=seed)[0],
        ("hessian_trace", "value"): trace,
        ("hessian_trace", "stderr"): stderr,
        ("average_case_adaptive", "value"): sharpness.average_case(*args, rho=rho, adaptive=True, seed=seed),
        ("average_case", "value"): sharpness.average_case(*args, rho=rho, adaptive=False, seed=seed),
        ("sam_sharpness", "value"): sharpness.sam_sharpness(*args, rho=rho, m=16),
        ("sam_sharpness_adaptive", "value"): sharpness.sam_sharpness(*args, rho=rho, m=16, adaptive=True),
    }
    for norm in ("linf", "l2"):
        for adaptive, suffix in ((True, "_adaptive"), (False, "")):
            value = sharpness.worst_case(*args, rho=rho, m=16, adaptive=adaptive, norm=norm, seed=seed)
            expected[(f"worst_case_{norm}{suffix}", "value")] = value
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert set(df["measure"]) == set(measure.names()) and df["value"].map(math.isfinite).all()


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_call_computes_nothing_and_gives_the_same_values(sweep, first):
    df, _ = first
    units = df["trial_id"].nunique() * (1 + len(RHOS) + 1)  # one entry per (trial, measure, rho)
    assert len(_cache_files(sweep)) >= units and not list((sweep / measure.CACHE_DIR).rglob("*.tmp"))
    again, stats = measure.measure_sweep(sweep, measures=MEASURES, rho_eval=RHOS, progress=False, return_stats=True, **TERMS)
    assert stats == {"submitted": 0, "cached": units, "failed": 0}
    pd.testing.assert_frame_equal(again, df)


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_whose_cache_entry_is_deleted_is_recomputed_alone(sweep, trials, first):
    df, _ = first
    trial_id = trials.loc["train[:256]", "trial_id"]
    (path,) = [
        p
        for p, e in _entries(sweep)
        if e["measure"] == "hessian_top" and e["trial_id"] == trial_id and e["settings"]["data"] == TERMS["data"]
    ]
    path.unlink()
    again, stats = measure.measure_sweep(sweep, measures=MEASURES, rho_eval=RHOS, progress=False, return_stats=True, **TERMS)
    assert stats["submitted"] == 1 and stats["failed"] == 0 and path.exists()
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), df.drop(columns="seconds"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_added_later_is_measured_alone(sweep, trials, first, tmp_path):
    copy = tmp_path / "grid"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns(measure.CACHE_DIR))
    early, late = trials.loc["train[:256]", "trial_id"], trials.loc["train[:320]", "trial_id"]
    kwargs = {"measures": ["hessian_top"], "progress": False, "return_stats": True, **TERMS}
    assert measure.measure_sweep(copy, trial_ids=[early], **kwargs)[1] == {"submitted": 1, "cached": 0, "failed": 0}
    df, stats = measure.measure_sweep(copy, **kwargs)
    assert stats == {"submitted": 1, "cached": 1, "failed": 0}
    assert sorted(p.parent.name for p in _cache_files(copy)) == sorted([early, late])
    original = first[0][first[0]["measure"] == "hessian_top"].set_index("trial_id")["value"]
    pd.testing.assert_series_equal(df.set_index("trial_id")["value"], original, check_like=True)


@pytest.mark.ray
@pytest.mark.slow
def test_a_changed_setting_makes_new_entries_and_a_new_rho_computes_only_itself(sweep, first):
    df, _ = first
    before = len(_cache_files(sweep))
    grid = [RHOS[1], 2 * RHOS[1]]
    again, stats = measure.measure_sweep(
        sweep, measures=["worst_case_linf_adaptive"], rho_eval=grid, progress=False, return_stats=True, **TERMS
    )
    trials_done = df["trial_id"].nunique()
    assert stats == {"submitted": trials_done, "cached": trials_done, "failed": 0}
    assert len(_cache_files(sweep)) == before + trials_done
    old = df[(df["measure"] == "worst_case_linf_adaptive") & (df["rho"] == RHOS[1])].set_index("trial_id")["value"]
    new = again[again["rho"] == RHOS[1]].set_index("trial_id")["value"]
    pd.testing.assert_series_equal(new, old)
    _, stats = measure.measure_sweep(
        sweep, measures=["worst_case_linf_adaptive"], rho_eval=[RHOS[1]], progress=False, return_stats=True, **{**TERMS, "m": 32}
    )
    assert stats == {"submitted": trials_done, "cached": 0, "failed": 0}


@pytest.mark.ray
@pytest.mark.slow
def test_the_failed_trial_is_skipped_and_asked_for_by_id_gives_an_error_row(sweep, trials, first):
    failed = trials.loc[FAILING_SPLIT]
    assert failed["trial_id"] not in set(first[0]["trial_id"])
    df, stats = measure.measure_sweep(
        sweep, measures=["hessian_top", "forgetting"], trial_ids=[failed["trial_id"]], progress=False, return_stats=True
    )
    assert stats == {"submitted": 0, "cached": 0, "failed": 2}
    assert df["measure"].tolist() == ["hessian_top", "forgetting"] and df["value"].isna().all()
    assert df["error"].str.contains(f"trial {failed['trial_id']} has no checkpoint \\(status ERROR\\)").all()
    assert not (sweep / measure.CACHE_DIR / failed["trial_id"]).exists()
    with pytest.raises(ValueError, match="trial_ids: nope not in the sweep"):
        measure.measure_sweep(sweep, measures=["hessian_top"], trial_ids=["nope"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_corrupt_checkpoint_gives_an_error_row_is_not_cached_and_the_others_succeed(sweep, trials, first, tmp_path, caplog):
    copy = tmp_path / "grid"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns(measure.CACHE_DIR))
    bad = trials.loc["train[:256]", "trial_id"]
    (Path(load_sweep(copy).set_index("trial_id").loc[bad, "checkpoint"]) / "state.pt").write_bytes(b"not a checkpoint" * 64)
    kwargs = {"measures": ["hessian_top", "forgetting"], "progress": False, "return_stats": True, **TERMS}
    with caplog.at_level(logging.WARNING, logger="analysis.measure"):
        df, stats = measure.measure_sweep(copy, **kwargs)
    assert stats == {"submitted": 4, "cached": 0, "failed": 1}
    broken = df[(df["trial_id"] == bad) & (df["measure"] == "hessian_top")]
    assert len(broken) == 1 and math.isnan(broken["value"].iloc[0]) and broken["error"].iloc[0]
    assert [r.getMessage() for r in caplog.records] == [f"measure hessian_top of trial {bad} failed: {broken['error'].iloc[0]}"]
    others = df.drop(index=broken.index)
    assert others["error"].isna().all() and others["value"].map(math.isfinite).all()
    # The good trial's value is that of the original sweep; the failure was not cached, so it is retried.
    good = others[others["measure"] == "hessian_top"].set_index("trial_id")["value"]
    original = first[0][first[0]["measure"] == "hessian_top"].set_index("trial_id")["value"]
    assert good.index.tolist() == [trials.loc["train[:320]", "trial_id"]]
    assert good.iloc[0] == original[good.index[0]]
    _, again = measure.measure_sweep(copy, **kwargs)
    assert again == {"submitted": 1, "cached": 3, "failed": 1}


@pytest.mark.ray
@pytest.mark.slow
def test_a_file_uri_sweep_is_measured_and_cached_through_its_uri(sweep, first, tmp_path):
    copy = tmp_path / "grid"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns(measure.CACHE_DIR))
    kwargs = {"measures": ["hessian_top", "forgetting"], "progress": False, "return_stats": True, **TERMS}
    df, stats = measure.measure_sweep(f"file://{copy}", **kwargs)
    assert stats == {"submitted": 4, "cached": 0, "failed": 0} and len(_cache_files(copy)) == 4
    assert df["checkpoint"].str.startswith(f"file://{copy}/runs/").all()
    local = first[0][first[0]["measure"].isin(["hessian_top", "forgetting"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(df[["trial_id", "statistic", "value"]], local[["trial_id", "statistic", "value"]])
    assert measure.measure_sweep(f"file://{copy}", **kwargs)[1] == {"submitted": 0, "cached": 4, "failed": 0}


@pytest.mark.ray
def test_the_hessian_command_measures_the_papers_protocol_and_caches_it_apart(sweep, trials, ray_session, capsys):
    from analysis.__main__ import HESSIAN_PROTOCOLS, main

    # The release's compute_hessian scripts: the first 8,192 training images, batches of 256, bilinear.
    assert HESSIAN_PROTOCOLS["paper"] == {"data": "train[:8192]", "batch_size": 256, "interpolation": "bilinear"}
    before = set(_cache_files(sweep))
    assert main(["hessian", str(sweep), "--protocol", "paper"]) == 0
    printed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    done = trials[trials["status"] == "TERMINATED"]
    assert sorted(printed) == sorted(done["trial_id"])
    for _, trial in done.iterrows():
        ms = load_measurable(trial["checkpoint"], split="train[:8192]", n=10**9, batch_size=256, interpolation="bilinear")
        assert len(ms.data[0][0]) == 256
        top = hessian.top_eigenvalues(ms.model, ms.loss_fn, ms.data, k=1, seed=0)[0]
        assert float(printed[trial["trial_id"]]) == pytest.approx(top, rel=1e-4)
    new = [json.loads(p.read_text())["settings"] for p in set(_cache_files(sweep)) - before]
    protocol = {"data": "train[:8192]", "batch_size": 256, "seed": 0, "interpolation": "bilinear"}
    assert new == [{**protocol, "k": 1, "method": "lanczos", "tol": 1e-3}] * len(done)
