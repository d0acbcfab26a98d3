"""``SearchSpace``: what one named experiment family needs to become a sweep."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from pf_sweep.config import TrialConfig

Suggest = Callable[[optuna.Trial], dict[str, Any] | None]
SEARCHED_PROBES = 64  # proposals drawn to find a define-by-run space's fields, conditional ones included


@dataclass(frozen=True)
class SearchSpace:
    """A sweep's space. ``suggest`` is Optuna define-by-run: the searched TrialConfig fields are
    ``trial.suggest_*`` calls (conditional ones inside ``if``), and its returned dict adds constants.
    A space with ``grid`` instead enumerates every combination through Tune's grid search.

    A preset gives ``points`` instead: named runs ({run name: TrialConfig fields}), each run once,
    with ``run_name`` set to its name. ``global_batch``, when set, fixes the examples per update:
    the per-worker ``batch_size`` of ``base`` is the largest a worker takes, and the sweep resolves
    workers x batch x accumulation for its worker count (``resolve_global_batch``).

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
    points: dict[str, dict[str, Any]] | None = None
    global_batch: int | None = None
    # A chained preset's runs start from other presets' runs: {run: (space, source run)}, see from_sweeps.
    sources: dict[str, tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.suggest, self.grid, self.points)) != 1:
            raise ValueError(f"Space {self.name!r} needs exactly one of suggest, grid or points")
        for run, fields in (self.points or {}).items():
            TrialConfig.from_dict({**self.base, **fields, "run_name": run})
        if self.mode not in ("max", "min"):
            raise ValueError(f"Invalid mode for space {self.name!r}: {self.mode!r} (allowed: max, min)")
        TrialConfig.from_dict(self.base)  # the fixed part alone must already be a valid trial

    def config_for(self, params: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrialConfig:
        """The trial that ``params`` (searched values) describe, on top of the base and overrides."""
        return TrialConfig.from_dict({**self.base, **(overrides or {}), **params})

    def sample(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """The first ``n`` parameter sets a fresh sampler would propose (for --dry-run and tests)."""
        if self.points is not None:
            return [self.point(run) for run in list(self.points)[:n]]
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

    def searched_fields(self) -> set[str]:
        """The fields this space sets per trial, which a fixed override (``--set``) cannot change.

        A grid's keys; for ``suggest``, every field that ``SEARCHED_PROBES`` proposals of a seeded
        random sampler set, and the points to evaluate: a conditional field is found when a random
        proposal takes its branch at least once in 64 (a branch rarer than that can be missed). A
        preset's named runs search nothing: ``--set`` wins over their fields.
        """
        if self.points is not None:
            return set()
        probes = self.sample(len(self.points_to_evaluate) + SEARCHED_PROBES, seed=0) if self.grid is None else [self.grid]
        return {field for params in [*probes, *self.points_to_evaluate] for field in params}

    def point(self, run: str) -> dict[str, Any]:
        """The searched-parameter dict of the named run ``run`` (its fields and its name)."""
        return {**self.points[run], "run_name": run}

    def with_runs(self, runs: list[str]) -> SearchSpace:
        """This preset restricted to ``runs`` (in the preset's order); an unknown name is a ValueError."""
        if self.points is None:
            raise ValueError(f"Invalid --runs: space {self.name!r} has no named runs (only the paper_* presets do)")
        unknown = [r for r in runs if r not in self.points]
        if unknown or not runs:
            raise ValueError(f"Invalid --runs {','.join(runs)!r} for {self.name}: known runs are {', '.join(self.points)}")
        kept = {r: f for r, f in self.points.items() if r in runs}
        sources = None if self.sources is None else {r: src for r, src in self.sources.items() if r in runs}
        return dataclasses.replace(self, points=kept, sources=sources)

    def from_sweeps(self, sweeps: list[str]) -> SearchSpace:
        """This chained preset with each run's ``pretrained_path`` set to its source run's final
        checkpoint, found in the earlier sweeps ``sweeps`` (directories); ValueError naming what is missing."""
        if not self.sources:
            raise ValueError(f"Invalid --from-sweep: space {self.name!r} starts from no earlier sweep")
        from pf_sweep.chained import source_checkpoints

        paths = source_checkpoints(self.sources, sweeps)
        points = {r: {**f, "pretrained_path": paths[r]} if r in paths else f for r, f in self.points.items()}
        return dataclasses.replace(self, points=points)


def search_around(space: SearchSpace, fields: list[str], *, workers: int = 1, num_samples: int = 16) -> SearchSpace:
    """A one-run preset (``with_runs([run])``) turned into an Optuna search of ``fields`` centred on
    that run's values, its own point evaluated first (``search_spaces/_centred.py`` has the ranges)."""
    from search_spaces._centred import centred_suggest

    if space.points is None or len(space.points) != 1:
        runs = ", ".join(space.points or {}) or "none"
        raise ValueError(f"Invalid --search: it searches around one named run; pick it with --runs (runs: {runs})")
    (run,) = space.points
    base = {**space.base, **space.points[run], "run_name": run}  # the searched values replace the run's own
    if space.global_batch:
        most = base.get("batch_size", 64)
        base["batch_size"], base["grad_accum_steps"] = resolve_global_batch(space.global_batch, workers, most)
    point = TrialConfig.from_dict(base).to_dict()
    suggest, centre = centred_suggest(point, fields, point["batch_size"], run)
    return dataclasses.replace(
        space,
        name=f"{space.name}_{run}_search",
        description=f"{space.description} (run {run}; searched: {', '.join(fields)})",
        base=base,
        points=None,
        sources=None,
        suggest=suggest,
        points_to_evaluate=(centre,),
        num_samples=num_samples,
        global_batch=None,
    )


def resolve_global_batch(global_batch: int, workers: int, max_per_worker: int) -> tuple[int, int]:
    """(per-worker batch, accumulation steps) with workers x batch x steps == global_batch.

    The per-worker batch is the largest divisor of global_batch / workers that is at most
    ``max_per_worker``, so the fewest accumulation steps are needed (the release's 4096 as 1 x 256 x 16,
    8 x 256 x 2, 32 x 128 x 1).
    """
    if workers < 1 or global_batch % workers:
        raise ValueError(
            f"Invalid worker count: a global batch of {global_batch} does not split over {workers} workers; "
            f"use a worker count that divides {global_batch}"
        )
    share = global_batch // workers
    batch = next(b for b in range(min(share, max_per_worker), 0, -1) if share % b == 0)
    return batch, share // batch
