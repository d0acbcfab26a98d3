"""analysis.tables: the paper's accuracy table layout, its numbers, and the Markdown / LaTeX / HTML renderers."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest

import analysis.tables as tables
from analysis import correlation

SET = "digits_spurious:validation_aligned"
SET_COLUMN = f"eval/{SET}/top1"


def _runs(with_sgd: bool = True) -> pd.DataFrame:
    """2 methods x 2 perturbations x 3 seeds with distinct known values (plus SGD, an ERROR trial)."""
    rng = np.random.default_rng(7)
    rows = []
    # Listed out of the paper's order on purpose: the table must reorder.
    for method in ("gsam", "sam"):
        for perturbation in ("obf", "max"):
            for seed in range(3):
                rows.append(
                    {
                        "trial_id": f"{method}-{perturbation}-{seed}",
                        "status": "TERMINATED",
                        "method": method,
                        "perturbation": perturbation,
                        "seed": seed,
                        "rho": 0.05,
                        "val/top1": float(rng.uniform(80, 95)),
                        "eval/train_subset/top1": float(rng.uniform(97, 100)),
                        SET_COLUMN: float(rng.uniform(85, 99)),
                    }
                )
    if with_sgd:
        rows.append({"trial_id": "sgd-0", "status": "TERMINATED", "method": "sgd", "perturbation": "max", "seed": 0,
                     "rho": 0.05, "val/top1": 70.0, "eval/train_subset/top1": 99.0, SET_COLUMN: 75.0})  # fmt: skip
    rows.append({"trial_id": "broken", "status": "ERROR", "method": "sam", "perturbation": "max", "seed": 9,
                 "rho": 0.05, "val/top1": 1000.0, SET_COLUMN: 1000.0})  # fmt: skip
    return pd.DataFrame(rows)


def _values(df: pd.DataFrame, method: str, perturbation: str, column: str) -> np.ndarray:
    done = df[(df.status == "TERMINATED") & (df.method == method) & (df.perturbation == perturbation)]
    return done[column].dropna().to_numpy(float)


def test_each_cell_is_mean_std_and_count_over_seeds():
    df = _runs()
    table = tables.accuracy_table(df)
    data = table.data.set_index(["method", "perturbation", "column"])
    for method, label in (("sam", "SAM"), ("gsam", "GSAM")):
        for perturbation, plabel in (("max", "max"), ("obf", "OBF")):
            for column, clabel in (("val/top1", "val/top1"), (SET_COLUMN, SET)):
                values = _values(df, method, perturbation, column)
                row = data.loc[(label, plabel, clabel)]
                assert row["n"] == 3
                assert row["mean"] == pytest.approx(values.mean())
                assert row["std"] == pytest.approx(values.std(ddof=1))
                expected = f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (3)"
                assert table.cells.loc[label, (clabel, plabel)] == expected


def test_rows_follow_the_papers_method_order_and_columns_the_perturbations():
    df = _runs()
    extra = df[df.method == "sam"].assign(method="randsam")
    table = tables.accuracy_table(pd.concat([extra, df]), extra=[])
    assert list(table.cells.index) == ["SGD", "SAM", "GSAM", "RandSAM"]
    assert list(table.cells.columns) == [("val/top1", "max"), ("val/top1", "OBF")]


def test_sgd_has_one_cell_under_max_whatever_its_perturbation_field():
    df = _runs()
    df = pd.concat([df, df[df.method == "sgd"].assign(perturbation="obf", seed=1, **{"val/top1": 72.0})])
    table = tables.accuracy_table(df, extra=[])
    sgd = table.data[table.data.method == "SGD"]
    assert list(sgd.perturbation) == ["max"]
    assert sgd["n"].item() == 2
    assert sgd["mean"].item() == pytest.approx(71.0)
    assert sgd["std"].item() == pytest.approx(np.std([70.0, 72.0], ddof=1))
    assert table.cells.loc["SGD", ("val/top1", "OBF")] == "—"


def test_a_single_run_has_no_std():
    table = tables.accuracy_table(_runs(), extra=[])
    sgd = table.data[table.data.method == "SGD"].iloc[0]
    assert sgd["n"] == 1 and np.isnan(sgd["std"])
    assert table.cells.loc["SGD", ("val/top1", "max")] == "70.0 ± — (1)"


def test_the_best_cell_of_each_column_is_marked():
    df = _runs()
    table = tables.accuracy_table(df)
    for column, label in (("val/top1", "val/top1"), (SET_COLUMN, SET)):
        means = {
            (m, p): round(_values(df, m, p, column).mean(), 1)
            for m in ("sgd", "sam", "gsam")
            for p in ("max", "obf")
            if len(_values(df, m, p, column))
        }
        best_value = max(means.values())
        expected = {(tables.METHOD_LABELS[m], tables.PERTURBATION_LABELS[p]) for (m, p), v in means.items() if v == best_value}
        marked = {
            (row, col[1])
            for row in table.best.index
            for col in table.best.columns
            if col[0] == label and table.best.loc[row, col]
        }
        assert marked == expected


def test_mode_min_marks_the_lowest_cell():
    df = _runs().assign(gen_gap=lambda d: d["eval/train_subset/top1"] - d["val/top1"])
    table = tables.accuracy_table(df, metric="gen_gap", extra=[], mode="min")
    done = df[df.status == "TERMINATED"].assign(perturbation=lambda d: d.perturbation.where(d.method != "sgd", "max"))
    lowest = done.groupby(["method", "perturbation"])["gen_gap"].mean().round(1).idxmin()
    marked = table.data[table.data.best]
    assert list(zip(marked.method, marked.perturbation, strict=True)) == [
        (tables.METHOD_LABELS[lowest[0]], tables.PERTURBATION_LABELS[lowest[1]])
    ]


def test_extra_evaluation_sets_appear_by_default_and_train_subset_does_not():
    df = _runs()
    assert list(tables.accuracy_table(df).cells.columns.get_level_values(0).unique()) == ["val/top1", SET]
    assert list(tables.accuracy_table(df, extra=[]).cells.columns.get_level_values(0).unique()) == ["val/top1"]
    named = tables.accuracy_table(df, extra=["eval/train_subset/top1", SET])
    assert list(named.cells.columns.get_level_values(0).unique()) == ["val/top1", "train_subset", SET]


def test_only_terminated_trials_enter_the_cells():
    df = _runs()
    table = tables.accuracy_table(df, extra=[])
    sam_max = table.data[(table.data.method == "SAM") & (table.data.perturbation == "max")]
    assert sam_max["n"].item() == 3
    assert sam_max["mean"].item() < 100  # the ERROR trial's 1000 is left out
    # Without a status column every row counts.
    all_rows = tables.accuracy_table(df.drop(columns="status"), extra=[], seeds=None)
    assert all_rows.data.set_index(["method", "perturbation"]).loc[("SAM", "max"), "n"] == 4


def test_nan_values_leave_their_cell_and_an_empty_cell_reads_a_dash():
    df = _runs()
    df.loc[(df.method == "gsam") & (df.perturbation == "obf"), SET_COLUMN] = np.nan
    df.loc[(df.method == "gsam") & (df.perturbation == "max") & (df.seed == 0), SET_COLUMN] = np.nan
    table = tables.accuracy_table(df)
    assert table.cells.loc["GSAM", (SET, "OBF")] == "—"
    gsam_max = table.data.set_index(["method", "perturbation", "column"]).loc[("GSAM", "max", SET)]
    assert gsam_max["n"] == 2
    assert gsam_max["mean"] == pytest.approx(np.nanmean(_values(df, "gsam", "max", SET_COLUMN)))


def test_runs_sharing_a_seed_in_one_cell_warn_naming_what_differs():
    df = _runs()
    df = pd.concat([df, df[(df.method == "sam") & (df.perturbation == "max")].assign(rho=0.2)])
    with pytest.warns(UserWarning, match=r"SAM/max pools.*\['rho'\]"):
        tables.accuracy_table(df)


def test_no_warning_when_every_cell_has_distinct_seeds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tables.accuracy_table(_runs())


def test_bad_input_raises_value_errors_that_name_the_problem():
    df = _runs()
    with pytest.raises(ValueError, match=r"\['val/top5'\] not in df \(columns: .*'val/top1'"):
        tables.accuracy_table(df, metric="val/top5")
    with pytest.raises(ValueError, match="no TERMINATED trials"):
        tables.accuracy_table(df.assign(status="RUNNING"))
    with pytest.raises(ValueError, match=r"Invalid extra: 'imagenet_r:test'.*sets: \['digits_spurious"):
        tables.accuracy_table(df, extra=["imagenet_r:test"])
    with pytest.raises(ValueError, match="Invalid seeds"):
        tables.accuracy_table(df.drop(columns="seed"))
    with pytest.raises(ValueError, match="Invalid mode"):
        tables.accuracy_table(df, mode="best")
    with pytest.raises(ValueError, match="no rows"):
        tables.accuracy_table(df.iloc[:0])


# ---------------------------------------------------------------------------------------- renderers


def _cell_keys(table: tables.Table) -> list[tuple[str, tuple[str, str]]]:
    return [(label, column) for label in table.cells.index for column in table.cells.columns]


def test_markdown_holds_every_cell_and_bolds_exactly_the_best():
    table = tables.accuracy_table(_runs())
    text = tables.to_markdown(table)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(table.cells)
    assert lines[0].split(" | ")[1] == "val/top1 (max)"
    for line, (label, row) in zip(lines[2:], table.cells.iterrows(), strict=True):
        parts = [p.strip() for p in line.strip("| ").split(" | ")]
        assert parts[0] == label
        for part, (column, cell) in zip(parts[1:], row.items(), strict=True):
            assert part == (f"**{cell}**" if table.best.loc[label, column] else cell)
    assert str(table) == text


def test_latex_is_booktabs_with_bold_best_and_escaped_labels():
    table = tables.accuracy_table(_runs())
    text = tables.to_latex(table, caption="Top-1", label="tab:top1")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert text.count(rule) == 1
    assert r"\multicolumn{2}{c}{val/top1}" in text
    assert r"digits\_spurious:validation\_aligned" in text
    assert text.count(r"\textbf{") == int(table.best.to_numpy().sum())
    for (label, column), cell in ((key, table.cells.loc[key]) for key in _cell_keys(table)):
        latex = cell.replace("±", r"$\pm$").replace("—", "---")
        assert (rf"\textbf{{{latex}}}" if table.best.loc[label, column] else latex) in text
    assert "±" not in text and r"\caption{Top-1}" in text


def test_html_holds_every_cell_and_bolds_the_best_cells():
    table = tables.accuracy_table(_runs())
    text = tables.to_html(table)
    for cell in table.cells.to_numpy().ravel():
        assert f">{cell}</td>" in text
    style = text[: text.index("</style>")]
    bold_block = re.search(r"([^{}]*)\{\s*font-weight: bold;", style).group(1)
    bold = {(int(r), int(c)) for r, c in re.findall(r"_row(\d+)_col(\d+)", bold_block)}
    assert bold == {tuple(int(i) for i in ij) for ij in np.argwhere(table.best.to_numpy())}


def test_renderers_refuse_anything_but_a_table():
    with pytest.raises(ValueError, match="Invalid table"):
        tables.to_markdown(pd.DataFrame({"a": [1]}))


# ---------------------------------------------------------------------------------------- correlation


def test_correlation_table_formats_tau_with_its_interval_and_each_statistic():
    corr = pd.DataFrame(
        {
            "tau": [0.4213, -0.05, np.nan],
            "tau_ci_low": [0.1049, np.nan, np.nan],
            "tau_ci_high": [0.7, np.nan, np.nan],
            "n": [48, 48, 1],
            "psi": [0.3149, 0.0, np.nan],
            "psi/rho": [0.25, -0.1, np.nan],
            "psi/sharpness_m": [0.379, 0.1, np.nan],
            "cmi": [0.0123, 0.0, np.nan],
        },
        index=pd.Index(["forget/flip_rate/mean", "hessian_top", "constant"], name="measure"),
    )
    cells = tables.correlation_table(corr).cells
    assert list(cells.columns) == ["tau [95% CI]", "n", "Psi", "psi/rho", "psi/sharpness_m", "CMI"]
    assert list(cells.loc["forget/flip_rate/mean"]) == ["0.42 [0.10, 0.70]", "48", "0.31", "0.25", "0.38", "0.01"]
    assert list(cells.loc["hessian_top"]) == ["-0.05", "48", "0.00", "-0.10", "0.10", "0.00"]
    assert list(cells.loc["constant"]) == ["—", "1", "—", "—", "—", "—"]
    assert tables.correlation_table(corr, decimals=3).cells.loc["forget/flip_rate/mean", "CMI"] == "0.012"


def test_correlation_table_renders_real_correlation_output():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"rho": np.repeat([0.02, 0.05, 0.2], 8), "sharpness_m": np.tile([4, 16, 32, 64], 6)})
    df["gen_gap"] = 5 + 10 * df.rho + rng.normal(0, 0.3, len(df))
    df["flip"] = df.gen_gap + rng.normal(0, 0.5, len(df))
    corr = correlation.table(df, ["flip"], "gen_gap", ["rho", "sharpness_m"], n_boot=50)
    table = tables.correlation_table(corr)
    row = corr.loc["flip"]
    assert table.cells.loc["flip", "tau [95% CI]"] == f"{row.tau:.2f} [{row.tau_ci_low:.2f}, {row.tau_ci_high:.2f}]"
    assert table.cells.loc["flip", "psi/rho"] == f"{row['psi/rho']:.2f}"
    latex = tables.to_latex(table)
    assert r"tau [95\% CI]" in latex and r"\toprule" in latex
    assert "0.0" not in tables.to_markdown(table).split("\n")[0]  # numbers stay out of the header
    assert table.data.equals(corr)


def test_correlation_table_rejects_other_frames():
    with pytest.raises(ValueError, match=r"\['tau_ci_low', 'tau_ci_high', 'psi', 'cmi'\] not in df"):
        tables.correlation_table(pd.DataFrame({"tau": [0.1]}))
    with pytest.raises(ValueError, match="non-empty"):
        tables.correlation_table(pd.DataFrame())
