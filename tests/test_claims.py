"""``analysis.claims``: each of the paper's claims answered from data, with the right verdict."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis import claims


def _grid(value) -> pd.DataFrame:
    rows = []
    for perturbation, rho, m, seed in itertools.product(["max", "obf"], [0.02, 0.05, 0.2], [4, 16, 64], [0, 1]):
        rows.append({"perturbation": perturbation, "rho": rho, "sharpness_m": m, "seed": seed, "method": "sam", "lr": 0.05})
    df = pd.DataFrame(rows)
    df["val/top1"] = [value(r) for r in df.itertuples()]
    return df


def test_paired_difference_pairs_runs_by_every_other_setting():
    rng = np.random.default_rng(0)
    noise = {k: rng.normal() for k in itertools.product([0.02, 0.05, 0.2], [4, 16, 64], [0, 1])}
    df = _grid(lambda r: 80 + noise[(r.rho, r.sharpness_m, r.seed)] + (2.0 if r.perturbation == "obf" else 0.0))
    d = claims.paired_difference(df, "val/top1")
    # Pairing cancels the shared noise exactly: every difference is 2.
    assert d["n"] == 18 and d["mean"] == pytest.approx(2.0) and d["ci_low"] == pytest.approx(2.0)
    (finding,) = claims.obf_vs_max(df, ["val/top1"])
    assert finding.verdict == "supported"


def test_a_difference_lost_in_noise_is_not_claimed():
    rng = np.random.default_rng(1)
    df = _grid(lambda r: 80 + rng.normal())
    (finding,) = claims.obf_vs_max(df, ["val/top1"])
    assert finding.ci_low < 0 < finding.ci_high and finding.verdict.startswith("not answered")


def test_m_trend_reads_falling_accuracy_as_support_and_a_falling_gap_as_contradiction():
    df = _grid(lambda r: 90 - np.log2(r.sharpness_m) + 0.01 * r.seed)
    df["gen_gap"] = df["val/top1"] - 80  # a gap that shrinks as m grows: the opposite of the claim
    found = {f.statistic: f for f in claims.m_trend(df)}
    assert found["τ(val/top1, m), all"].estimate < -0.8 and found["τ(val/top1, m), all"].verdict == "supported"
    assert found["τ(gen_gap, m), all"].verdict == "contradicted"


def test_forgetting_that_tracks_the_gap_beats_flatness_that_does_not():
    rng = np.random.default_rng(2)
    df = _grid(lambda r: 0.0)
    df["gen_gap"] = rng.normal(size=len(df))
    df["forget/flip_rate/mean"] = df["gen_gap"] + 0.01 * rng.normal(size=len(df))
    df["hessian_top"] = rng.normal(size=len(df))
    side = claims.forgetting_vs_flatness(df, ["forget/flip_rate/mean"], ["hessian_top"], ["rho", "sharpness_m", "perturbation"])
    assert list(side["family"]) == ["forgetting", "flatness"]
    assert claims.claim3_verdict(side).startswith("supported")
    swapped = side.assign(family=["flatness", "forgetting"])
    assert claims.claim3_verdict(swapped).startswith("contradicted")
