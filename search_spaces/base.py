"""``SearchSpace``: what one named experiment family needs to become a sweep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from pf_sweep.config import TrialConfig

Suggest = Callable[[optuna.Trial], dict[str, Any] | None]


@dataclass(frozen=True)
class SearchSpace:
    """A sweep's space. ``suggest`` is Optuna define-by-run: the searched TrialConfig fields are
    ``trial.suggest_*`` calls (conditional ones inside ``if``), and its returned dict adds constants.
    A space with ``grid`` instead enumerates every combination through Tune's grid search.

    ``suggest`` must be a module-level function: the searcher's state is pickled when a sweep is
    saved, and a restored sweep imports it again.
    """

    name: str
    description: str
    base: dict[str, Any]
    suggest: Suggest | None = None
    grid: dict[str, list[Any]] | None = None
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    metric: str = "val/top1"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if (self.suggest is None) == (self.grid is None):
            raise ValueError(f"Space {self.name!r} needs exactly one of suggest or grid")
        if self.mode not in ("max", "min"):
            raise ValueError(f"Invalid mode for space {self.name!r}: {self.mode!r} (allowed: max, min)")
        TrialConfig.from_dict(self.base)  # the fixed part alone must already be a valid trial

    def config_for(self, params: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrialConfig:
        """The trial that ``params`` (searched values) describe, on top of the base and overrides."""
        return TrialConfig.from_dict({**self.base, **(overrides or {}), **params})

    def sample(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """The first ``n`` parameter sets a fresh sampler would propose (for --dry-run and tests)."""
        if self.grid is not None:
            import itertools

            keys = list(self.grid)
            combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]
            return combos[:n]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            direction="maximize" if self.mode == "max" else "minimize", sampler=optuna.samplers.RandomSampler(seed=seed)
        )
        out = []
        for point in self.points_to_evaluate[:n]:
            out.append(dict(point))
        while len(out) < n:
            trial = study.ask()
            constants = self.suggest(trial) or {}
            out.append({**trial.params, **constants})
            study.tell(trial, 0.0)
        return out
