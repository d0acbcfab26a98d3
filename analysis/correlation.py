"""How well a measure (sharpness, forgetting, ...) ranks runs by generalization, across a sweep.

The statistics of Jiang et al. (2019), "Fantastic Generalization Measures and Where to Find Them":

- ``kendall_tau``: Kendall's tau-b between a measure and a target over all runs, with a bootstrap
  confidence interval (``spearman`` likewise);
- ``granulated_kendall``: Psi, tau within groups of runs that differ in one hyperparameter only,
  averaged per hyperparameter, then over hyperparameters: a measure must track the target whichever
  knob moved it;
- ``conditional_mi``: K, the mutual information between the signs of pairwise differences of the
  measure and of the target, conditioned on the values of up to two hyperparameters, normalised by
  the target's conditional entropy, minimised over the conditioning sets: a measure that only
  tracks the target through some hyperparameter gets K near 0;
- ``table``: all of the above for several measures, one row each.

Inputs are a DataFrame with one row per run (``analysis.load_sweep``): the measure and the target
(``gen_gap``, a validation or test error, ...) are any numeric columns, hyperparameters any columns
of hashable values (None counts as a value). Rows where the measure or the target is NaN are left out.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

# ----------------------------------------------------------------------------------- rank correlations


def kendall_tau(x: Any, y: Any, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Kendall's tau-b (ties handled as ``scipy.stats.kendalltau`` does) with a bootstrap CI.

    The interval is the percentile bootstrap over ``n_boot`` resamples of the (x, y) pairs, drawn
    from ``numpy.random.default_rng(seed)``; resamples whose tau is undefined (a constant side) are
    skipped. Pairs with a NaN on either side are dropped first; ``n`` is how many were used.
    Returns ``{"tau", "ci_low", "ci_high", "n"}`` (NaN statistics when fewer than 2 pairs remain).
    """
    x, y = _paired(x, y)
    low, high = _bootstrap_ci(_tau_b_rows, x, y, n_boot, seed, confidence)
    return {"tau": _tau_b(x, y), "ci_low": low, "ci_high": high, "n": len(x)}


def spearman(x: Any, y: Any, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Spearman's rho (``scipy.stats.spearmanr``) with the bootstrap CI of ``kendall_tau``.

    Returns ``{"rho", "ci_low", "ci_high", "n"}``.
    """
    x, y = _paired(x, y)
    low, high = _bootstrap_ci(_rho_rows, x, y, n_boot, seed, confidence)
    return {"rho": _rho(x, y), "ci_low": low, "ci_high": high, "n": len(x)}


def _paired(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"Invalid x/y: shapes {x.shape} and {y.shape} (need two 1-D sequences of the same length)")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def _tau_b(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():  # a constant side: tau is undefined, NaN says so
        warnings.simplefilter("ignore")
        return float(scipy.stats.kendalltau(x, y).statistic)


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(scipy.stats.spearmanr(x, y).statistic)


def _tau_b_rows(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """tau-b of each row pair. For small n as sign matrices, tau-b = sum sx sy / sqrt(sum sx^2 sum sy^2)
    over ordered pairs (the same number scipy computes, many resamples per kernel); scipy row by row otherwise."""
    n = xs.shape[1]
    if n > _VECTOR_TAU_MAX_N:
        return np.array([_tau_b(a, b) for a, b in zip(xs, ys, strict=True)])
    out = np.empty(len(xs))
    chunk = max(1, 2_000_000 // (n * n))
    for start in range(0, len(xs), chunk):
        a, b = xs[start : start + chunk], ys[start : start + chunk]
        sx = np.sign(a[:, :, None] - a[:, None, :])
        sy = np.sign(b[:, :, None] - b[:, None, :])
        den = np.sqrt(np.abs(sx).sum(axis=(1, 2)) * np.abs(sy).sum(axis=(1, 2)))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start : start + chunk] = np.where(den > 0, (sx * sy).sum(axis=(1, 2)) / den, np.nan)
    return out


_VECTOR_TAU_MAX_N = 100  # above this scipy's O(n log n) per resample beats the O(n^2) kernel


def _rho_rows(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair: Pearson correlation of the (tie-averaged) ranks."""
    rx = scipy.stats.rankdata(xs, axis=1)
    ry = scipy.stats.rankdata(ys, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)


def _bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    n_boot: int,
    seed: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` (applied to rows of resampled x and y) over ``n_boot`` resamples."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 0:
        raise ValueError(f"Invalid n_boot: {n_boot!r} (must be an integer >= 0; 0 skips the interval)")
    if not 0 < confidence < 1:
        raise ValueError(f"Invalid confidence: {confidence!r} (must be in (0, 1), e.g. 0.95)")
    if n_boot == 0 or len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = statistic(x[draws], y[draws])
    stats = stats[~np.isnan(stats)]
    if not stats.size:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


# ----------------------------------------------------------------------------------- Jiang et al.


def granulated_kendall(df: pd.DataFrame, measure: str, target: str, hyperparams: Sequence[str]) -> dict[str, Any]:
    """Jiang et al.'s granulated Kendall coefficient Psi.

    For each hyperparameter h, psi_h is the mean, over the settings of the *other* listed
    hyperparameters, of tau-b between measure and target among the runs sharing that setting (so
    they differ only in h, and in any column not listed, e.g. the seed); Psi is the mean of the psi_h.
    A group with fewer than 2 runs, or whose tau is undefined (measure or target constant in it), is
    skipped; a psi_h with no usable group is NaN and left out of Psi. A hyperparameter with a single
    value in ``df`` is left out with a warning. Returns ``{"psi", "parts": {h: psi_h}}``.
    """
    data, hps = _prepare(df, measure, target, hyperparams)
    parts = {h: _psi_part(data, measure, target, h, [o for o in hps if o != h]) for h in hps}
    finite = [v for v in parts.values() if not math.isnan(v)]
    return {"psi": float(np.mean(finite)) if finite else float("nan"), "parts": parts}


def _psi_part(data: pd.DataFrame, measure: str, target: str, h: str, others: list[str]) -> float:
    groups = (g for _, g in data.groupby(others, dropna=False, sort=False)) if others else [data]
    taus = [_tau_b(g[measure].to_numpy(float), g[target].to_numpy(float)) for g in groups if len(g) >= 2]
    taus = [t for t in taus if not math.isnan(t)]
    return float(np.mean(taus)) if taus else float("nan")


def conditional_mi(
    df: pd.DataFrame, measure: str, target: str, hyperparams: Sequence[str], max_subset: int = 2
) -> dict[str, Any]:
    """Jiang et al.'s conditional mutual information K (p(U_S)-weighted, natural log; the ratio is base-free).

    On every ordered pair of runs (i, j), V_mu = sign(mu_i - mu_j) and V_g = sign(g_i - g_j); U_S is
    the pair's values (h_i, h_j) of each hyperparameter h in S. For every subset S of the listed
    hyperparameters with |S| <= ``max_subset`` (the empty set included),

        I(V_mu; V_g | U_S) / H(V_g | U_S),  both sums over cells u weighted by p(U_S = u),

    and K is the minimum over the subsets. Ties: a pair with V_g = 0 (equal targets, which includes
    i = j) is dropped, as there is no order to predict; a tie in the measure is kept as a third value
    V_mu = 0 ("the measure does not order this pair"), so a measure that is constant where the target
    varies is charged for it (dropping those pairs would hide exactly the pairs it fails on). A subset
    whose H(V_g | U_S) is 0 (every cell fixes the target's order, 0/0) gives NaN and does not enter
    the minimum; K is NaN when no subset is defined.
    A hyperparameter with a single value is left out with a warning. Returns
    ``{"k", "per_subset": {tuple of names: value}, "n_pairs"}``.
    """
    if isinstance(max_subset, bool) or not isinstance(max_subset, numbers.Integral) or max_subset < 0:
        raise ValueError(f"Invalid max_subset: {max_subset!r} (must be an integer >= 0)")
    data, hps = _prepare(df, measure, target, hyperparams)
    i, j, v_mu, v_g = _sign_pairs(data[measure].to_numpy(float), data[target].to_numpy(float))
    codes = {h: pd.factorize(data[h], use_na_sentinel=False)[0] for h in hps}
    per_subset: dict[tuple[str, ...], float] = {}
    for size in range(min(max_subset, len(hps)) + 1):
        for subset in itertools.combinations(hps, size):
            per_subset[subset] = _normalized_cmi(_pair_cells(codes, subset, i, j), v_mu, v_g)
    finite = [v for v in per_subset.values() if not math.isnan(v)]
    return {"k": min(finite) if finite else float("nan"), "per_subset": per_subset, "n_pairs": len(i)}


def _sign_pairs(mu: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ordered pairs (i, j) with g_i != g_j; V_mu coded 0, 1, 2 for -1, 0, +1 and V_g 0, 1 for -1, +1."""
    d_g = np.sign(g[:, None] - g[None, :])
    i, j = np.nonzero(d_g != 0)
    return i, j, (np.sign(mu[i] - mu[j]) + 1).astype(np.int64), (d_g[i, j] > 0).astype(np.int64)


def _pair_cells(codes: dict[str, np.ndarray], subset: tuple[str, ...], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """One integer per pair naming its cell u = ((h_i, h_j) for h in subset)."""
    cell = np.zeros(len(i), dtype=np.int64)
    for h in subset:
        levels = int(codes[h].max()) + 1
        cell = (cell * levels + codes[h][i]) * levels + codes[h][j]
    return cell


def _normalized_cmi(cell: np.ndarray, v_mu: np.ndarray, v_g: np.ndarray) -> float:
    if not len(cell):
        return float("nan")
    _, cell = np.unique(cell, return_inverse=True)
    n_cells = int(cell.max()) + 1
    joint = np.bincount((cell * 3 + v_mu) * 2 + v_g, minlength=6 * n_cells).reshape(n_cells, 3, 2).astype(float)
    per_cell = joint.sum(axis=(1, 2))
    p_cell = per_cell / per_cell.sum()
    p = joint / per_cell[:, None, None]  # p(V_mu, V_g | u)
    p_mu, p_g = p.sum(axis=2, keepdims=True), p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(p > 0, p * np.log(p / (p_mu * p_g)), 0.0).sum(axis=(1, 2))
        h_g = -np.where(p_g > 0, p_g * np.log(p_g), 0.0).sum(axis=(1, 2))
    info, entropy = float(p_cell @ mi), float(p_cell @ h_g)
    return max(info, 0.0) / entropy if entropy > 1e-12 else float("nan")


# ----------------------------------------------------------------------------------- the table


def table(
    df: pd.DataFrame,
    measures: Sequence[str],
    target: str,
    hyperparams: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_subset: int = 2,
) -> pd.DataFrame:
    """One row per measure: ``tau``, ``tau_ci_low``, ``tau_ci_high``, ``n``, ``psi``, ``psi/<hp>`` for each
    hyperparameter kept (single-valued ones are left out, with one warning each) and ``cmi`` (K)."""
    if isinstance(measures, str) or not measures:
        raise ValueError(f"Invalid measures: {measures!r} (need a non-empty list of column names)")
    hps = _varying(df, hyperparams)
    rows = {}
    for measure in measures:
        _require_columns(df, [measure, target])
        tau = kendall_tau(df[measure], df[target], n_boot=n_boot, seed=seed, confidence=confidence)
        psi = granulated_kendall(df, measure, target, hps)
        k = conditional_mi(df, measure, target, hps, max_subset=max_subset)["k"]
        rows[measure] = {
            "tau": tau["tau"],
            "tau_ci_low": tau["ci_low"],
            "tau_ci_high": tau["ci_high"],
            "n": tau["n"],
            "psi": psi["psi"],
            **{f"psi/{h}": v for h, v in psi["parts"].items()},
            "cmi": k,
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "measure"
    return out


# ----------------------------------------------------------------------------------- inputs


def _require_columns(df: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise ValueError(f"Invalid column(s): {missing} not in df (columns: {sorted(map(str, df.columns))})")


def _varying(df: pd.DataFrame, hyperparams: Sequence[str]) -> list[str]:
    """The listed hyperparameters that take more than one value; the others are warned about and dropped."""
    if isinstance(hyperparams, str):
        raise ValueError(f"Invalid hyperparams: {hyperparams!r} (need a list of column names, e.g. [{hyperparams!r}])")
    hyperparams = list(hyperparams)
    if len(set(hyperparams)) != len(hyperparams):
        raise ValueError(f"Invalid hyperparams: {hyperparams} (names must be distinct)")
    _require_columns(df, hyperparams)
    kept = []
    for h in hyperparams:
        values = df[h].unique()
        if len(values) > 1:
            kept.append(h)
        else:
            value = repr(values[0].item() if isinstance(values[0], np.generic) else values[0]) if len(values) else "no rows"
            warnings.warn(f"hyperparameter {h!r} takes a single value ({value}) in df: left out", stacklevel=3)
    return kept


def _prepare(df: pd.DataFrame, measure: str, target: str, hyperparams: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    _require_columns(df, [measure, target])
    hps = _varying(df, hyperparams)
    clash = [h for h in hps if h in (measure, target)]
    if clash:
        raise ValueError(f"Invalid hyperparams: {clash} (the measure and the target cannot be hyperparameters)")
    keep = (df[measure].notna() & df[target].notna()).to_numpy()
    data = df.loc[keep, list(dict.fromkeys([measure, target, *hps]))]  # measure == target is allowed
    return data.reset_index(drop=True), hps
