"""analysis.plots: each figure draws what its data says (lines, points, cells), and saving writes PNG and PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot: a test machine has no display

import matplotlib.pyplot as plt  # only to check that no pyplot figure is left behind
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

import analysis.plots as plots
from analysis import correlation

RHOS = (0.02, 0.05, 0.2)


def _runs() -> pd.DataFrame:
    """SAM and GSAM, max and OBF, 3 rho x 2 m x 2 seeds, plus 3 SGD runs and one ERROR trial."""
    rng = np.random.default_rng(3)
    rows = []
    for method in ("sam", "gsam"):
        for perturbation in ("max", "obf"):
            for rho in RHOS:
                for m in (4, 64):
                    for seed in (0, 1):
                        flip = 0.02 + rho * (0.1 if perturbation == "obf" else 0.05) * (64 / m) ** 0.25 + rng.normal(0, 0.004)
                        rows.append(
                            {
                                "trial_id": f"{method}{perturbation}{rho}{m}{seed}",
                                "status": "TERMINATED",
                                "method": method,
                                "perturbation": perturbation,
                                "rho": rho,
                                "sharpness_m": m,
                                "seed": seed,
                                "val/top1": 90 + 30 * flip + rng.normal(0, 0.3),
                                "gen_gap": 9 - 20 * flip + rng.normal(0, 0.3),
                                "forget/flip_rate/mean": flip,
                            }
                        )
    for seed in range(3):
        sgd = {"method": "sgd", "perturbation": "max", "rho": 0.05, "sharpness_m": 64, "seed": seed}
        rows.append({"trial_id": f"sgd{seed}", "status": "TERMINATED", **sgd, "val/top1": 85.0 + seed, "gen_gap": 12.0,
                     "forget/flip_rate/mean": np.nan})  # fmt: skip
    rows.append({"trial_id": "err", "status": "ERROR", "method": "sam", "perturbation": "max", "rho": 0.05,
                 "sharpness_m": 4, "seed": 5, "val/top1": -500.0, "gen_gap": 500.0, "forget/flip_rate/mean": 9.0})  # fmt: skip
    return pd.DataFrame(rows)


def _history(n_trials: int = 4, epochs: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for t in range(n_trials):
        method, perturbation = ("sgd", "max") if t % 3 == 0 else ("sam", ("max", "obf")[t % 2])
        for epoch in rng.permutation(epochs):  # unsorted on purpose
            rows.append(
                {
                    "trial_id": f"t{t}",
                    "epoch": int(epoch),
                    "method": method,
                    "perturbation": perturbation,
                    "rho": 0.05,
                    "sharpness_m": 16,
                    "train/loss": float(rng.uniform(0, 2)),
                    "val/loss": float(rng.uniform(0, 2)),
                    "val/top1": float(rng.uniform(50, 95)),
                    "forget/flip_rate": float(rng.uniform(0, 0.1)),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    yield
    assert plt.get_fignums() == []  # the module never goes through pyplot


# ---------------------------------------------------------------------------------------- accuracy_vs


def _series(fig: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)) for line in fig.axes[0].lines
    }


def test_accuracy_vs_rho_draws_the_mean_of_each_method_and_perturbation():
    df = _runs()
    fig = plots.accuracy_vs(df, x="rho")
    series = _series(fig)
    assert list(series) == ["SAM (max)", "SAM (OBF)", "GSAM (max)", "GSAM (OBF)", "SGD (n=3)"]
    done = df[df.status == "TERMINATED"]
    for method, label in (("sam", "SAM"), ("gsam", "GSAM")):
        for perturbation, plabel in (("max", "max"), ("obf", "OBF")):
            x, y = series[f"{label} ({plabel})"]
            group = done[(done.method == method) & (done.perturbation == perturbation)]
            np.testing.assert_allclose(x, RHOS)
            np.testing.assert_allclose(y, [group[group.rho == r]["val/top1"].mean() for r in RHOS])
    assert series["SGD (n=3)"][1][0] == pytest.approx(86.0)  # a horizontal line at SGD's mean
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    np.testing.assert_allclose(ax.get_xticks(), RHOS)
    assert "ρ" in ax.get_xlabel() and "val/top1" in ax.get_ylabel()


def test_accuracy_vs_bands_span_one_std_or_the_min_max():
    df = _runs()
    sam_max = df[(df.status == "TERMINATED") & (df.method == "sam") & (df.perturbation == "max")]
    for band, low, high in (
        ("std", lambda g: g.mean() - g.std(ddof=1), lambda g: g.mean() + g.std(ddof=1)),
        ("minmax", lambda g: g.min(), lambda g: g.max()),
    ):
        fig = plots.accuracy_vs(df, x="sharpness_m", band=band)
        bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
        assert len(bands) == 4  # one per (method, perturbation); SGD's is a span
        vertices = bands[0].get_paths()[0].vertices
        for m in (4, 64):
            ys = vertices[np.isclose(vertices[:, 0], m), 1]
            values = sam_max[sam_max.sharpness_m == m]["val/top1"]
            assert ys.min() == pytest.approx(low(values))
            assert ys.max() == pytest.approx(high(values))
        assert fig.axes[0].get_xscale() == "log"


def test_accuracy_vs_works_for_gen_gap_and_linear_x_with_non_positive_values():
    df = _runs()
    df.loc[df.rho == 0.02, "rho"] = 0.0
    fig = plots.accuracy_vs(df, x="rho", metric="gen_gap")
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    assert "generalization gap" in ax.get_ylabel()
    _, y = _series(fig)["SAM (OBF)"]
    done = df[(df.status == "TERMINATED") & (df.method == "sam") & (df.perturbation == "obf")]
    np.testing.assert_allclose(y, done.groupby("rho")["gen_gap"].mean().to_numpy())


def test_accuracy_vs_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.subplots()
    assert plots.accuracy_vs(_runs(), ax=ax) is fig
    assert len(ax.lines) == 5


def test_accuracy_vs_names_a_missing_column_and_the_available_ones():
    with pytest.raises(ValueError, match=r"\['val/top5'\] not in df \(columns: .*'val/top1'"):
        plots.accuracy_vs(_runs(), metric="val/top5")
    with pytest.raises(ValueError, match="Invalid band"):
        plots.accuracy_vs(_runs(), band="sem")
    with pytest.raises(ValueError, match="non-empty"):
        plots.accuracy_vs(pd.DataFrame())


# ---------------------------------------------------------------------------------------- scatter


def test_scatter_has_one_point_per_run_coloured_by_perturbation():
    df = _runs()
    fig = plots.measure_vs_generalization(df, "forget/flip_rate/mean", "gen_gap")
    groups = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert [c.get_label() for c in groups] == ["max", "OBF"]
    done = df[(df.status == "TERMINATED") & df["forget/flip_rate/mean"].notna()]  # SGD has no flip rate
    for collection, perturbation in zip(groups, ("max", "obf"), strict=True):
        points = collection.get_offsets()
        expected = done[done.perturbation == perturbation][["forget/flip_rate/mean", "gen_gap"]].to_numpy()
        np.testing.assert_allclose(np.asarray(points), expected)


def test_scatter_title_carries_kendall_tau_and_its_interval():
    df = _runs()
    fig = plots.measure_vs_generalization(df, "forget/flip_rate/mean", "val/top1", hue="method", n_boot=200, seed=4)
    done = df[(df.status == "TERMINATED") & df["forget/flip_rate/mean"].notna()]
    tau = scipy.stats.kendalltau(done["forget/flip_rate/mean"], done["val/top1"]).statistic
    ci = correlation.kendall_tau(done["forget/flip_rate/mean"], done["val/top1"], n_boot=200, seed=4)
    title = fig.axes[0].get_title()
    assert title == f"Kendall τ = {tau:.2f} [{ci['ci_low']:.2f}, {ci['ci_high']:.2f}], n = {len(done)}"
    assert [c.get_label() for c in fig.axes[0].collections] == ["GSAM", "SAM"]


def test_scatter_without_hue_is_one_collection_and_without_interval_no_brackets():
    fig = plots.measure_vs_generalization(_runs(), "forget/flip_rate/mean", hue=None, n_boot=0)
    assert len(fig.axes[0].collections) == 1
    assert "[" not in fig.axes[0].get_title()


def test_scatter_rejects_too_few_runs_and_missing_columns():
    df = _runs()
    with pytest.raises(ValueError, match="at least 2"):
        plots.measure_vs_generalization(df.iloc[:1], "forget/flip_rate/mean")
    with pytest.raises(ValueError, match=r"\['hessian_top'\] not in df"):
        plots.measure_vs_generalization(df, "hessian_top")


# ---------------------------------------------------------------------------------------- curves


def test_training_curves_draw_one_subplot_per_metric_and_one_line_per_trial():
    history = _history(n_trials=4)
    metrics = ["train/loss", "val/top1", "forget/flip_rate"]
    fig = plots.training_curves(history, metrics=metrics)
    assert [ax.get_title() for ax in fig.axes] == metrics
    for ax, metric in zip(fig.axes, metrics, strict=True):
        assert len(ax.lines) == 4
        expected = history[history.trial_id == "t2"].sort_values("epoch")
        np.testing.assert_allclose(ax.lines[2].get_xdata(), expected["epoch"])
        np.testing.assert_allclose(ax.lines[2].get_ydata(), expected[metric])
        assert ax.get_xlabel() == "epoch"
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 4


def test_training_curves_defaults_pick_the_metrics_present_and_trial_ids_select():
    history = _history(n_trials=4)
    fig = plots.training_curves(history, trial_ids=["t1", "t3"])
    assert [ax.get_title() for ax in fig.axes] == ["train/loss", "val/loss", "val/top1", "forget/flip_rate"]
    assert all(len(ax.lines) == 2 for ax in fig.axes)


def test_training_curves_colour_many_trials_by_method_and_perturbation():
    fig = plots.training_curves(_history(n_trials=15), metrics=["val/top1"])
    assert len(fig.axes[0].lines) == 15
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["SAM (OBF)", "SAM (max)", "SGD"]


def test_training_curves_colour_many_trials_by_the_perturbation_when_the_method_is_fixed():
    # load_history leaves out a field every trial shares, as the method of m_sharpness_study (SAM)
    history = _history(n_trials=21)
    history = history[history.method == "sam"].drop(columns="method")  # 14 trials
    fig = plots.training_curves(history, metrics=["val/top1"])
    lines = fig.axes[0].lines
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["max", "OBF"]  # the tables' order
    by_perturbation = {}
    for line, trial in zip(lines, history.drop_duplicates("trial_id")["perturbation"], strict=True):
        by_perturbation.setdefault(trial, set()).add(line.get_color())
    assert all(len(colours) == 1 for colours in by_perturbation.values())
    assert by_perturbation["max"] != by_perturbation["obf"]
    assert fig.get_suptitle() == "14 trials, coloured by perturbation"
    few = plots.training_curves(history[history.trial_id.isin(["t1", "t2"])], metrics=["val/top1"])
    assert [t.get_text() for t in few.legends[0].get_texts()] == ["t1 OBF ρ=0.05 m=16", "t2 max ρ=0.05 m=16"]


def test_training_curves_of_one_epoch_draw_a_point_per_trial_on_one_integer_tick():
    history = _history(n_trials=15, epochs=1)
    fig = plots.training_curves(history, metrics=["val/top1", "val/loss"])
    for ax in fig.axes:
        assert all(line.get_marker() not in (None, "None", "") for line in ax.lines)
        assert list(ax.get_xticks()) == [0]
        assert ax.get_xlim() == (-0.5, 0.5)


def test_training_curves_label_sgd_without_perturbation_rho_or_m_and_skip_missing_values():
    history = _history(n_trials=3)
    history.loc[history.trial_id == "t1", "sharpness_m"] = np.nan
    fig = plots.training_curves(history, metrics=["val/top1"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["t0 SGD", "t1 SAM/OBF ρ=0.05", "t2 SAM/max ρ=0.05 m=16"]


def test_training_curves_name_a_missing_metric_and_unknown_trials():
    history = _history()
    with pytest.raises(ValueError, match=r"\['forget/kl'\] not in history \(columns: .*'train/loss'"):
        plots.training_curves(history, metrics=["forget/kl"])
    with pytest.raises(ValueError, match=r"Invalid trial_ids: \['nope'\]"):
        plots.training_curves(history, trial_ids=["nope"])
    with pytest.raises(ValueError, match="none of"):
        plots.training_curves(history[["trial_id", "epoch"]])


# ---------------------------------------------------------------------------------------- heat map


def test_correlation_heatmap_shows_each_statistic_annotated_on_a_scale_centred_at_zero():
    corr = pd.DataFrame(
        {"tau": [0.5, -0.25], "tau_ci_low": [0.1, -0.5], "tau_ci_high": [0.8, 0.1], "n": [20, 20],
         "psi": [0.4, np.nan], "psi/rho": [0.3, -0.1], "psi/sharpness_m": [0.5, 0.0], "cmi": [0.05, 0.01]},
        index=pd.Index(["flip", "hessian"], name="measure"),
    )  # fmt: skip
    fig = plots.correlation_heatmap(corr)
    ax = fig.axes[0]
    (image,) = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    shown = ["tau", "psi", "psi/rho", "psi/sharpness_m", "cmi"]
    np.testing.assert_allclose(np.ma.filled(image.get_array(), np.nan), corr[shown].to_numpy(), equal_nan=True)
    assert image.norm.vmin == -1 and image.norm.vmax == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["τ", "Ψ", "ψ(ρ)", "ψ(m)", "CMI"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["flip", "hessian"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(
        "—" if np.isnan(v) else f"{v:.2f}" for v in corr[shown].to_numpy().ravel()
    )
    assert len(fig.axes) == 2  # the heat map and its colour bar


def test_correlation_heatmap_takes_correlation_table_output():
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"rho": np.repeat([0.02, 0.2], 6), "sharpness_m": np.tile([4, 16, 64], 4)})
    df["gen_gap"] = rng.normal(size=len(df))
    df["a"], df["b"] = df.gen_gap + rng.normal(size=len(df)), rng.normal(size=len(df))
    corr = correlation.table(df, ["a", "b"], "gen_gap", ["rho", "sharpness_m"], n_boot=20)
    ax = plots.correlation_heatmap(corr).axes[0]
    assert len(ax.texts) == 2 * 5


def test_correlation_heatmap_rejects_an_empty_frame():
    with pytest.raises(ValueError, match="corr_df"):
        plots.correlation_heatmap(pd.DataFrame())


# ---------------------------------------------------------------------------------------- saving


def test_save_writes_a_non_empty_png_and_pdf(tmp_path):
    fig = plots.accuracy_vs(_runs())
    png, pdf = plots.save(fig, tmp_path / "figures" / "acc_rho_0.05")
    assert (png.name, pdf.name) == ("acc_rho_0.05.png", "acc_rho_0.05.pdf")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
    assert plots.save(fig, tmp_path / "again.png") == (tmp_path / "again.png", tmp_path / "again.pdf")


def test_save_refuses_what_is_not_a_figure(tmp_path):
    with pytest.raises(ValueError, match="Invalid fig"):
        plots.save("not a figure", tmp_path / "x")
