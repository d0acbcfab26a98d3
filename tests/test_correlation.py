"""analysis.correlation: Kendall tau-b and Spearman with bootstrap CIs, Jiang et al.'s Psi and CMI, the table.

References are computed independently in the tests: scipy for the rank correlations, a loop over
groups for Psi, and a loop over run pairs with scikit-learn's mutual information for the CMI.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import mutual_info_score

from analysis import correlation

# ----------------------------------------------------------------------------------- helpers


def tied_pair(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated integer arrays with many ties on both sides."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, n).astype(float)
    y = np.round(x + rng.normal(0, 1.5, n))
    return x, y


def grid(seeds: int = 2) -> pd.DataFrame:
    """Full grid a x b x seed with the gap an additive function of a and b (seeds are replicates)."""
    alpha = {0: 0.0, 1: 1.0, 2: 2.5}
    beta = {0: 0.0, 1: 10.0, 2: 30.0}
    rows = [
        {"a": a, "b": b, "seed": s, "f_a": alpha[a], "g_b": beta[b]} for a, b, s in itertools.product(alpha, beta, range(seeds))
    ]
    df = pd.DataFrame(rows)
    df["gap"] = df["f_a"] + df["g_b"]
    return df


def reference_psi_part(df: pd.DataFrame, measure: str, target: str, h: str, others: list[str]) -> float:
    taus = []
    settings = itertools.product(*(sorted(df[o].unique()) for o in others))
    for setting in settings:
        rows = df
        for o, v in zip(others, setting, strict=True):
            rows = rows[rows[o] == v]
        if len(rows) < 2:
            continue
        tau = scipy.stats.kendalltau(rows[measure], rows[target]).statistic
        if not math.isnan(tau):
            taus.append(tau)
    return float(np.mean(taus))


def reference_cmi(df: pd.DataFrame, measure: str, target: str, subset: tuple[str, ...]) -> float:
    """I(V_mu; V_g | U_S) / H(V_g | U_S) by a loop over ordered pairs (target ties dropped)."""
    cells: dict[tuple, tuple[list, list]] = {}
    records = df.to_dict("records")
    for i, j in itertools.permutations(range(len(records)), 2):
        ri, rj = records[i], records[j]
        v_g = np.sign(ri[target] - rj[target])
        if v_g == 0:
            continue
        u = tuple((ri[h], rj[h]) for h in subset)
        cells.setdefault(u, ([], []))
        cells[u][0].append(np.sign(ri[measure] - rj[measure]))
        cells[u][1].append(v_g)
    total = sum(len(mu) for mu, _ in cells.values())
    info = sum(len(mu) / total * mutual_info_score(mu, g) for mu, g in cells.values())
    entropy = sum(len(g) / total * scipy.stats.entropy(np.unique(g, return_counts=True)[1]) for _, g in cells.values())
    return info / entropy


# ----------------------------------------------------------------------------------- kendall / spearman


@pytest.mark.parametrize(("seed", "n"), [(0, 12), (1, 40), (2, 97), (3, 150)])
def test_tau_is_scipys_tau_b_on_data_with_ties(seed, n):
    x, y = tied_pair(seed, n)
    assert len(np.unique(x)) < n and len(np.unique(y)) < n  # ties on both sides
    result = correlation.kendall_tau(x, y, n_boot=0)
    assert result["tau"] == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
    assert result["n"] == n


@pytest.mark.parametrize("n", [30, 130])  # the vectorised kernel (n <= 100) and scipy per resample
def test_bootstrap_interval_is_the_percentile_interval_of_pair_resamples(n):
    x, y = tied_pair(4, n)
    result = correlation.kendall_tau(x, y, n_boot=300, seed=7, confidence=0.9)
    draws = np.random.default_rng(7).integers(0, n, size=(300, n))
    taus = np.array([scipy.stats.kendalltau(x[d], y[d]).statistic for d in draws])
    low, high = np.quantile(taus[~np.isnan(taus)], [0.05, 0.95])
    assert result["ci_low"] == pytest.approx(low, abs=1e-12)
    assert result["ci_high"] == pytest.approx(high, abs=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    x, y = tied_pair(5, 60)
    a = correlation.kendall_tau(x, y, seed=3)
    b = correlation.kendall_tau(x, y, seed=3)
    c = correlation.kendall_tau(x, y, seed=4)
    assert a["ci_low"] < a["tau"] < a["ci_high"]
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_wider_confidence_gives_a_wider_interval():
    x, y = tied_pair(6, 50)
    narrow = correlation.kendall_tau(x, y, confidence=0.5)
    wide = correlation.kendall_tau(x, y, confidence=0.99)
    assert wide["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < wide["ci_high"]


def test_nan_pairs_are_dropped_and_counted():
    x, y = tied_pair(7, 30)
    x_nan, y_nan = x.copy(), y.copy()
    x_nan[[1, 5]] = np.nan
    y_nan[[5, 9, 20]] = np.nan
    keep = ~(np.isnan(x_nan) | np.isnan(y_nan))
    result = correlation.kendall_tau(pd.Series(x_nan), list(y_nan), n_boot=50)
    assert result["n"] == 26
    assert result["tau"] == pytest.approx(scipy.stats.kendalltau(x[keep], y[keep]).statistic, abs=1e-12)
    assert result == correlation.kendall_tau(x[keep], y[keep], n_boot=50)


def test_constant_side_gives_nan_tau():
    result = correlation.kendall_tau([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert math.isnan(result["tau"]) and math.isnan(result["ci_low"])


def test_spearman_is_scipys_with_the_same_bootstrap():
    x, y = tied_pair(8, 45)
    result = correlation.spearman(x, y, n_boot=200, seed=1)
    assert set(result) == {"rho", "ci_low", "ci_high", "n"}
    assert result["rho"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    draws = np.random.default_rng(1).integers(0, 45, size=(200, 45))
    rhos = np.array([scipy.stats.spearmanr(x[d], y[d]).statistic for d in draws])
    low, high = np.quantile(rhos[~np.isnan(rhos)], [0.025, 0.975])
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": [1, 2, 3], "y": [1, 2]}, "Invalid x/y"),
        ({"x": [1, 2, 3], "y": [1, 2, 3], "confidence": 1.5}, "Invalid confidence: 1.5"),
        ({"x": [1, 2, 3], "y": [1, 2, 3], "n_boot": -1}, "Invalid n_boot: -1"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        correlation.kendall_tau(**kwargs)


# ----------------------------------------------------------------------------------- Psi


def test_psi_parts_follow_each_axis_and_cancel():
    df = grid()
    df["mu"] = df["f_a"] - df["g_b"]  # agrees with the gap along a, opposes it along b
    result = correlation.granulated_kendall(df, measure="mu", target="gap", hyperparams=["a", "b"])
    assert result["parts"] == pytest.approx({"a": 1.0, "b": -1.0})
    assert result["psi"] == pytest.approx(0.0)


def test_psi_parts_match_a_loop_over_groups():
    df = grid(seeds=3)
    rng = np.random.default_rng(0)
    df["gap"] = df["gap"] + rng.normal(0, 3, len(df))
    df["mu"] = df["f_a"] + rng.normal(0, 1, len(df))
    result = correlation.granulated_kendall(df, "mu", "gap", ["a", "b", "seed"])
    expected = {h: reference_psi_part(df, "mu", "gap", h, [o for o in ("a", "b", "seed") if o != h]) for h in ("a", "b", "seed")}
    assert result["parts"] == pytest.approx(expected, abs=1e-12)
    assert result["psi"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_groups_with_one_run_are_skipped():
    df = grid(seeds=1)
    df = df[~((df["b"] == 2) & (df["a"] != 0))]  # b = 2 ran with a single value of a
    rng = np.random.default_rng(1)
    df = df.assign(mu=df["gap"] + rng.normal(0, 5, len(df)))
    result = correlation.granulated_kendall(df, "mu", "gap", ["a", "b"])
    assert result["parts"]["a"] == pytest.approx(reference_psi_part(df, "mu", "gap", "a", ["b"]), abs=1e-12)


def test_single_valued_hyperparameter_is_warned_about_and_left_out():
    df = grid().assign(opt="sgd")
    df["mu"] = df["gap"]
    with pytest.warns(UserWarning, match="'opt' takes a single value"):
        result = correlation.granulated_kendall(df, "mu", "gap", ["a", "opt", "b"])
    assert set(result["parts"]) == {"a", "b"}


def test_missing_column_raises():
    with pytest.raises(ValueError, match="Invalid column"):
        correlation.granulated_kendall(grid(), "nope", "gap", ["a"])


# ----------------------------------------------------------------------------------- CMI


def test_measure_equal_to_the_gap_has_cmi_one_given_every_subset():
    df = grid()
    df["gap"] = df["gap"] + np.random.default_rng(2).normal(0, 0.01, len(df))
    result = correlation.conditional_mi(df.assign(mu=df["gap"]), "mu", "gap", ["a", "b", "seed"])
    assert set(result["per_subset"]) == {(), ("a",), ("b",), ("seed",), ("a", "b"), ("a", "seed"), ("b", "seed")}
    assert result["per_subset"] == pytest.approx(dict.fromkeys(result["per_subset"], 1.0))
    assert result["k"] == pytest.approx(1.0)


def test_measure_explained_by_a_hyperparameter_has_cmi_zero_given_it():
    df = grid()
    rng = np.random.default_rng(3)
    df["gap"] = df["f_a"] + 0.1 * df["b"] + rng.normal(0, 0.01, len(df))  # b moves the gap, not the measure
    result = correlation.conditional_mi(df.assign(mu=df["f_a"]), "mu", "gap", ["a", "b"])
    assert result["per_subset"][()] > 0.5  # unconditionally the measure looks informative...
    assert result["per_subset"][("a",)] == pytest.approx(0.0, abs=1e-12)  # ...but a explains all of it
    assert result["k"] == pytest.approx(0.0, abs=1e-12)


def test_cmi_matches_a_loop_over_pairs_with_mutual_info_score():
    df = grid(seeds=2)
    rng = np.random.default_rng(4)
    df["gap"] = np.round(df["gap"] + rng.normal(0, 6, len(df)))  # target ties: dropped
    df["mu"] = np.round(df["f_a"] * 2 + rng.normal(0, 2, len(df)))  # measure ties: a value of their own
    result = correlation.conditional_mi(df, "mu", "gap", ["a", "b", "seed"])
    for subset in [(), ("a",), ("seed",), ("a", "b"), ("b", "seed")]:
        assert result["per_subset"][subset] == pytest.approx(reference_cmi(df, "mu", "gap", subset), abs=1e-10), subset
    assert result["k"] == pytest.approx(min(result["per_subset"].values()))


def test_max_subset_limits_the_conditioning_sets():
    df = grid().assign(mu=lambda d: d["gap"])
    result = correlation.conditional_mi(df, "mu", "gap", ["a", "b", "seed"], max_subset=1)
    assert set(result["per_subset"]) == {(), ("a",), ("b",), ("seed",)}


def test_subset_that_fixes_the_targets_order_is_nan_and_skipped():
    df = grid(seeds=1)  # the gap is a function of (a, b): given both, its order is known
    df["mu"] = df["gap"] + np.random.default_rng(5).normal(0, 1, len(df))
    result = correlation.conditional_mi(df, "mu", "gap", ["a", "b"])
    assert math.isnan(result["per_subset"][("a", "b")])
    assert result["k"] == pytest.approx(min(v for v in result["per_subset"].values() if not math.isnan(v)))


# ----------------------------------------------------------------------------------- table


def test_table_has_one_row_per_measure_with_every_statistic():
    df = grid(seeds=2).assign(opt="sgd")
    rng = np.random.default_rng(6)
    df["gap"] = df["gap"] + rng.normal(0, 1, len(df))
    df["sharp"] = df["gap"] + rng.normal(0, 5, len(df))
    df["forget"] = df["f_a"] - df["g_b"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = correlation.table(df, measures=["sharp", "forget"], target="gap", hyperparams=["a", "b", "opt"], n_boot=100)
    assert sum("'opt'" in str(w.message) for w in caught) == 1  # warned once, not once per statistic
    assert list(out.index) == ["sharp", "forget"] and out.index.name == "measure"
    assert list(out.columns) == ["tau", "tau_ci_low", "tau_ci_high", "n", "psi", "psi/a", "psi/b", "cmi"]
    for measure in ("sharp", "forget"):
        tau = correlation.kendall_tau(df[measure], df["gap"], n_boot=100)
        psi = correlation.granulated_kendall(df, measure, "gap", ["a", "b"])
        cmi = correlation.conditional_mi(df, measure, "gap", ["a", "b"])
        row = out.loc[measure]
        assert (row["tau"], row["tau_ci_low"], row["tau_ci_high"], row["n"]) == (tau["tau"], tau["ci_low"], tau["ci_high"], 18)
        assert (row["psi"], row["psi/a"], row["psi/b"]) == (psi["psi"], psi["parts"]["a"], psi["parts"]["b"])
        assert row["cmi"] == cmi["k"]
