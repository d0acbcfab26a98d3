"""A search around a preset run's point: ``--search rho,sharpness_m,obf_gamma``.

Each searched field gets a range centred on the run's value, on a log scale since these knobs act
multiplicatively: rho, lr, weight decay and GSAM's alpha from a quarter to four times the value;
OBF's gamma from a hundredth of it (at least 1e-12) up to 1, its largest valid value; m among the
divisors of the per-worker batch from a quarter to four times it. With ``rho_policy="lr_prop"``,
``min_rho`` keeps its ratio to rho. The run's own point is evaluated first.

``CentredSuggest`` is a module-level class: Tune pickles the searcher (and this suggest function
with it) by reference when it saves a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

SCALED = ("rho", "lr", "weight_decay", "gsam_alpha")
SEARCHABLE = (*SCALED, "obf_gamma", "sharpness_m")


@dataclass(frozen=True)
class CentredSuggest:
    """Optuna define-by-run suggest: ``centre`` holds the run's value of each searched field."""

    centre: dict[str, Any]
    m_choices: tuple[int, ...] = ()
    min_rho_ratio: float | None = None  # min_rho / rho of an lr_prop run

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        for name in SCALED:
            if name in self.centre:
                value = self.centre[name]
                trial.suggest_float(name, value / 4, value * 4, log=True)
        if "obf_gamma" in self.centre:
            gamma = self.centre["obf_gamma"]
            trial.suggest_float("obf_gamma", max(gamma / 100, 1e-12), 1.0, log=True)
        if "sharpness_m" in self.centre:
            trial.suggest_categorical("sharpness_m", list(self.m_choices))
        if self.min_rho_ratio is not None and "rho" in trial.params:
            return {"min_rho": trial.params["rho"] * self.min_rho_ratio}
        return None


def centred_suggest(point: dict[str, Any], fields: list[str], batch_size: int, run: str) -> tuple[CentredSuggest, dict]:
    """The suggest function searching ``fields`` around ``point`` (a resolved run's config as a dict),
    and the point itself as Optuna's first trial; ValueError for a field that cannot be searched here."""
    unknown = [f for f in fields if f not in SEARCHABLE]
    if unknown or not fields:
        raise ValueError(f"Invalid --search {','.join(fields)!r}: searchable fields are {', '.join(SEARCHABLE)}")
    sam = point["method"] != "sgd"
    meaningless = {
        "rho": not sam,
        "sharpness_m": not sam,
        "gsam_alpha": point["method"] != "gsam",
        "obf_gamma": point["perturbation"] != "obf",
    }
    for name in fields:
        if meaningless.get(name):
            how = f"method {point['method']}, perturbation {point['perturbation']}"
            raise ValueError(f"Invalid --search {name}: run {run!r} does not use it ({how})")
        if not point.get(name):
            raise ValueError(f"Invalid --search {name}: run {run!r} has {name}={point.get(name)}, no value to search around")
    centre = {name: point[name] for name in fields}
    m_choices: tuple[int, ...] = ()
    if "sharpness_m" in centre:
        m = centre["sharpness_m"]
        m_choices = tuple(d for d in range(max(1, m // 4), min(batch_size, 4 * m) + 1) if batch_size % d == 0)
    ratio = None
    if "rho" in centre and point.get("rho_policy") == "lr_prop":
        ratio = point["min_rho"] / point["rho"]
    return CentredSuggest(centre, m_choices, ratio), centre
