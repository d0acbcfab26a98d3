"""rho schedules (pf_sweep.optim.rho) against the formula of docs/sam.md ("The radius rho")."""

from __future__ import annotations

import pytest

from pf_sweep.optim.rho import ConstantRho, LrProportionalRho, rho_schedule_from_dict


def lr_prop(lr: float, rho_max: float, rho_min: float, lr_max: float, lr_min: float) -> float:
    """rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min), clamped at 0."""
    return max(0.0, rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min))


@pytest.mark.parametrize("lr", [0.0, 1e-4, 0.3, 10.0])
def test_constant_rho_ignores_the_lr(lr):
    assert ConstantRho(0.05)(lr) == 0.05


def test_constant_rho_accepts_zero():
    assert ConstantRho(0.0)(0.1) == 0.0


def test_negative_constant_rho_raises():
    with pytest.raises(ValueError, match="rho"):
        ConstantRho(-0.01)


@pytest.mark.parametrize("lr", [0.01, 0.05, 0.1, 0.37, 0.5])
def test_lr_prop_follows_linear_formula_inside_lr_range(lr):
    schedule = LrProportionalRho(rho_max=0.2, rho_min=0.02, lr_max=0.5, lr_min=0.01)
    assert schedule(lr) == pytest.approx(lr_prop(lr, 0.2, 0.02, 0.5, 0.01), rel=1e-12)


def test_lr_prop_gives_rho_max_at_lr_max_and_rho_min_at_lr_min():
    schedule = LrProportionalRho(rho_max=0.2, rho_min=0.02, lr_max=0.5, lr_min=0.01)
    assert schedule(0.5) == pytest.approx(0.2, rel=1e-12)
    assert schedule(0.01) == pytest.approx(0.02, rel=1e-12)


def test_lr_prop_extrapolates_linearly_above_lr_max():
    schedule = LrProportionalRho(rho_max=0.2, rho_min=0.0, lr_max=1.0, lr_min=0.0)
    assert schedule(1.5) == pytest.approx(0.3, rel=1e-12)


def test_lr_prop_is_clamped_at_zero_below_lr_min():
    # 0.01 + 0.19 * (0.0 - 0.1) / 0.9 < 0
    schedule = LrProportionalRho(rho_max=0.2, rho_min=0.01, lr_max=1.0, lr_min=0.1)
    assert lr_prop(0.0, 0.2, 0.01, 1.0, 0.1) == 0.0
    assert schedule(0.0) == 0.0


def test_lr_prop_with_decreasing_rho_is_clamped_at_zero_above_lr_max():
    schedule = LrProportionalRho(rho_max=0.0, rho_min=0.1, lr_max=1.0, lr_min=0.0)
    assert schedule(0.5) == pytest.approx(0.05, rel=1e-12)
    assert schedule(2.0) == 0.0


@pytest.mark.parametrize("lr", [0.0, 0.1, 0.2, 5.0])
def test_lr_prop_with_equal_lr_bounds_gives_rho_max(lr):
    schedule = LrProportionalRho(rho_max=0.2, rho_min=0.02, lr_max=0.1, lr_min=0.1)
    assert schedule(lr) == 0.2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rho_max": -0.1, "rho_min": 0.0, "lr_max": 1.0, "lr_min": 0.0}, "rho_max"),
        ({"rho_max": 0.1, "rho_min": -0.1, "lr_max": 1.0, "lr_min": 0.0}, "rho_min"),
        ({"rho_max": 0.1, "rho_min": 0.0, "lr_max": 0.1, "lr_min": 0.2}, "lr_max"),
    ],
)
def test_invalid_lr_prop_arguments_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LrProportionalRho(**kwargs)


@pytest.mark.parametrize(
    "schedule",
    [ConstantRho(0.07), LrProportionalRho(rho_max=0.2, rho_min=0.02, lr_max=0.5, lr_min=0.01)],
    ids=["constant", "lr_prop"],
)
def test_schedule_round_trips_through_dict(schedule):
    d = schedule.to_dict()
    assert all(isinstance(v, str | float) for v in d.values())
    assert rho_schedule_from_dict(d) == schedule


def test_schedule_dict_names_its_policy():
    assert ConstantRho(0.07).to_dict()["policy"] == "constant"
    assert LrProportionalRho(0.2, 0.0, 1.0, 0.0).to_dict()["policy"] == "lr_prop"


def test_unknown_policy_in_dict_raises():
    with pytest.raises(ValueError, match="cosine"):
        rho_schedule_from_dict({"policy": "cosine", "rho": 0.1})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_schedules_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        ConstantRho(bad)
    with pytest.raises(ValueError, match="finite"):
        LrProportionalRho(rho_max=0.1, rho_min=0.0, lr_max=bad, lr_min=0.0)
