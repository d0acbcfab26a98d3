"""The paper's three claims, each answered from a sweep's data with a confidence interval.

1. OBF beats the standard ("max") perturbation: the accuracy difference OBF - max over runs paired
   by every other setting (rho, m, seed), its mean and a bootstrap CI.
2. Smaller perturbation batches m generalize better: Kendall tau of accuracy (and ``gen_gap``)
   against m, with its bootstrap CI.
3. Perturbed forgetting tracks generalization more than flatness: tau, Psi and CMI of the
   ``forget/*`` aggregates next to those of the sharpness measures, on the same runs.

A claim whose interval spans zero is reported as not answered at this scale, never as a finding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import correlation

PAIRING = ("rho", "sharpness_m", "seed", "method", "lr")


@dataclass(frozen=True)
class Finding:
    claim: str
    statistic: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str


MIN_PAIRS = 3


def _verdict(low: float, high: float, n: int, supports_if_positive: bool = True) -> str:
    if n < MIN_PAIRS or not (np.isfinite(low) and np.isfinite(high)):
        return f"not enough data (n = {n})"
    if low <= 0 <= high:
        return "not answered at this scale (the CI spans 0)"
    positive = low > 0
    return "supported" if positive == supports_if_positive else "contradicted"


def paired_difference(
    df: pd.DataFrame,
    metric: str,
    *,
    by: str = "perturbation",
    treatment: str = "obf",
    control: str = "max",
    pair_on: Sequence[str] = PAIRING,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Mean of ``metric``(treatment) - ``metric``(control) over runs equal in every ``pair_on`` column.

    Returns ``{"mean", "ci_low", "ci_high", "n"}``; the CI is a percentile bootstrap over pairs.
    """
    keys = [k for k in pair_on if k in df.columns]
    wide = df.pivot_table(index=keys, columns=by, values=metric, aggfunc="mean")
    if treatment not in wide or control not in wide:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    diff = (wide[treatment] - wide[control]).dropna().to_numpy()
    if len(diff) == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    boots = rng.choice(diff, size=(n_boot, len(diff)), replace=True).mean(axis=1)
    alpha = (1 - confidence) / 2
    return {
        "mean": float(diff.mean()),
        "ci_low": float(np.quantile(boots, alpha)),
        "ci_high": float(np.quantile(boots, 1 - alpha)),
        "n": len(diff),
    }


def obf_vs_max(df: pd.DataFrame, metrics: Sequence[str]) -> list[Finding]:
    out = []
    for metric in metrics:
        if metric not in df:
            continue
        d = paired_difference(df, metric)
        out.append(
            Finding(
                "1. OBF vs max",
                f"mean Δ {metric} (OBF − max)",
                d["mean"],
                d["ci_low"],
                d["ci_high"],
                d["n"],
                _verdict(d["ci_low"], d["ci_high"], d["n"]),
            )
        )
    return out


def m_trend(df: pd.DataFrame, metrics: Sequence[str] = ("val/top1", "gen_gap"), seed: int = 0) -> list[Finding]:
    """Kendall tau of each metric against m: negative for accuracy means smaller m is better."""
    out = []
    for metric in metrics:
        if metric not in df or df["sharpness_m"].nunique() < 2:
            continue
        for perturbation, runs in [("all", df), *df.groupby("perturbation")]:
            t = correlation.kendall_tau(runs["sharpness_m"], runs[metric], seed=seed)
            # Accuracy should fall as m grows (tau < 0); the gap should grow with m (tau > 0).
            better_small = metric != "gen_gap"
            verdict = _verdict(t["ci_low"], t["ci_high"], t["n"], supports_if_positive=not better_small)
            out.append(
                Finding(
                    "2. smaller m generalizes better",
                    f"τ({metric}, m), {perturbation}",
                    t["tau"],
                    t["ci_low"],
                    t["ci_high"],
                    t["n"],
                    verdict,
                )
            )
    return out


def forgetting_vs_flatness(
    df: pd.DataFrame, forgetting: Sequence[str], flatness: Sequence[str], hyperparams: Sequence[str], target: str = "gen_gap"
) -> pd.DataFrame:
    """``correlation.table`` of both families of measures on the same runs, with a ``family`` column."""
    measures = [m for m in [*forgetting, *flatness] if m in df and df[m].notna().sum() >= 3]
    if not measures:
        return pd.DataFrame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = correlation.table(df, measures=measures, target=target, hyperparams=list(hyperparams))
    table.insert(0, "family", ["forgetting" if m in forgetting else "flatness" for m in table.index])
    return table


def findings_frame(findings: Sequence[Finding]) -> pd.DataFrame:
    return pd.DataFrame([f.__dict__ for f in findings])


def claim3_verdict(table: pd.DataFrame) -> str:
    """Forgetting beats flatness when its best |tau| interval lies above flatness's best one."""
    if table.empty or set(table["family"]) != {"forgetting", "flatness"}:
        return "not enough data (needs both forgetting and flatness measures)"

    def best(family: str) -> pd.Series:
        rows = table[table["family"] == family]
        return rows.loc[rows["tau"].abs().idxmax()]

    f, s = best("forgetting"), best("flatness")

    def interval(row: pd.Series) -> tuple[float, float]:  # of |tau|
        lo, hi = sorted((abs(row["tau_ci_low"]), abs(row["tau_ci_high"])))
        return (0.0, hi) if row["tau_ci_low"] <= 0 <= row["tau_ci_high"] else (lo, hi)

    (f_lo, f_hi), (s_lo, s_hi) = interval(f), interval(s)
    if f_lo > s_hi:
        return f"supported: |τ| of {f.name} ≥ {f_lo:.2f} > {s_hi:.2f} ≥ |τ| of {s.name}"
    if s_lo > f_hi:
        return f"contradicted: |τ| of {s.name} ≥ {s_lo:.2f} > {f_hi:.2f} ≥ |τ| of {f.name}"
    return f"not answered at this scale: the |τ| intervals of {f.name} and {s.name} overlap"
