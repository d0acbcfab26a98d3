"""Perturbation-radius (rho) schedules.

GSAM ties rho to the learning rate ("lr_prop") so that the perturbation shrinks as training anneals;
the schedule is a pure function of the current lr so it needs no state of its own to resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

RHO_POLICIES = ("constant", "lr_prop")


@dataclass(frozen=True)
class ConstantRho:
    """rho does not depend on the learning rate."""

    rho: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f"Invalid rho: {self.rho} (must be finite and >= 0)")

    def __call__(self, lr: float) -> float:
        return self.rho

    def to_dict(self) -> dict[str, Any]:
        return {"policy": "constant", **asdict(self)}


@dataclass(frozen=True)
class LrProportionalRho:
    """rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min), clamped at 0.

    When lr_max == lr_min the lr never moves relative to its range, so rho stays at rho_max.
    """

    rho_max: float
    rho_min: float
    lr_max: float
    lr_min: float

    def __post_init__(self) -> None:
        values = (self.rho_max, self.rho_min, self.lr_max, self.lr_min)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"Invalid lr_prop schedule: {self} (every value must be finite)")
        if self.rho_max < 0 or self.rho_min < 0:
            raise ValueError(f"Invalid rho range: rho_min={self.rho_min}, rho_max={self.rho_max} (must be >= 0)")
        if self.lr_max < self.lr_min:
            raise ValueError(f"Invalid lr range: lr_min={self.lr_min} > lr_max={self.lr_max}")

    def __call__(self, lr: float) -> float:
        if self.lr_max == self.lr_min:
            return self.rho_max
        frac = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return max(0.0, self.rho_min + (self.rho_max - self.rho_min) * frac)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": "lr_prop", **asdict(self)}


RhoSchedule = ConstantRho | LrProportionalRho


def rho_schedule_from_dict(d: dict[str, Any]) -> RhoSchedule:
    """Inverse of ``to_dict``: what ``SAM.load_state_dict`` uses to restore the schedule."""
    d = dict(d)
    policy = d.pop("policy")
    if policy == "constant":
        return ConstantRho(**d)
    if policy == "lr_prop":
        return LrProportionalRho(**d)
    raise ValueError(f"Invalid rho policy: {policy!r} (allowed: {', '.join(RHO_POLICIES)})")
