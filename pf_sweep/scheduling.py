"""Trials that cannot get their resources: refused at once, or failed after a bounded wait.

Ray never fails a task or a placement group that no node can hold; Tune only logs a warning and
Ray Train retries its worker group forever. So a sweep asking for a GPU on a cluster without one
would wait for ever. pf-sweep checks, once Ray is up, that one trial's bundles (its Tune actor and
its Train workers) fit on the nodes: on a local Ray, which cannot grow, a trial that does not fit
is refused at once (``ValueError``). On a cluster (``--address``), which may be autoscaling, it is
a warning, and ``ScheduleWatchdog`` fails the sweep (``UnschedulableError``) once trials have waited
``PF_SWEEP_SCHEDULE_TIMEOUT_S`` seconds (default 300) with none of them training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from ray.tune import Callback

from pf_sweep.config import TrialConfig
from pf_sweep.executors import trial_actor_resources

logger = logging.getLogger(__name__)

SCHEDULE_TIMEOUT_ENV = "PF_SWEEP_SCHEDULE_TIMEOUT_S"
DEFAULT_SCHEDULE_TIMEOUT_S = 300.0
POLL_S = 2.0  # how often the watchdog reads Ray's placement-group table
_EPS = 1e-9


class UnschedulableError(RuntimeError):
    """No trial of the sweep could get its resources within the schedule timeout."""


Bundle = dict[str, float]


def trial_bundles(base: dict[str, Any], in_actor: bool) -> tuple[Bundle, list[Bundle]]:
    """(the Tune trial actor's bundle, the Train workers' bundles) one trial of ``base`` asks Ray for."""
    actor = {key.upper(): float(value) for key, value in trial_actor_resources(base, in_actor).items()}
    if in_actor:
        return actor, []
    cfg = TrialConfig.from_dict(base)
    worker = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        worker["GPU"] = float(cfg.gpus_per_worker)
    return actor, [worker] * cfg.num_workers


def _take(node: Bundle, bundle: Bundle) -> bool:
    """Reserve ``bundle`` on ``node`` (mutated) if it fits there."""
    if any(node.get(key, 0.0) + _EPS < amount for key, amount in bundle.items() if amount > 0):
        return False
    for key, amount in bundle.items():
        node[key] = node.get(key, 0.0) - amount
    return True


def fits(actor: Bundle, workers: list[Bundle], nodes: list[Bundle]) -> bool:
    """Whether the workers (each on one node, PACK may spread them) and then the actor fit on ``nodes``.

    The workers' bundles are identical, so placing them first-fit is exact for them.
    """
    free = [dict(node) for node in nodes]
    return all(any(_take(node, bundle) for node in free) for bundle in [*workers, actor])


def _fmt(resources: Bundle) -> str:
    shown = {key: value for key, value in resources.items() if key in ("CPU", "GPU") or value > 0}
    shown.setdefault("CPU", 0.0)
    shown.setdefault("GPU", 0.0)
    return ", ".join(f"{value:g} {key}" for key, value in sorted(shown.items()) if key in ("CPU", "GPU"))


def describe_demand(actor: Bundle, workers: list[Bundle]) -> str:
    """E.g. ``2 workers x (1 CPU, 1 GPU) + a Tune actor of (0.01 CPU, 0 GPU)``."""
    if not workers:
        return f"({_fmt(actor)}) for its Tune actor, which trains"
    return f"{len(workers)} worker{'s' if len(workers) > 1 else ''} x ({_fmt(workers[0])}) + a Tune actor of ({_fmt(actor)})"


def node_resources() -> list[Bundle]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def describe_cluster(nodes: list[Bundle]) -> str:
    total: Bundle = {}
    for node in nodes:
        for key, value in node.items():
            total[key] = total.get(key, 0.0) + value
    if len(nodes) == 1:
        return f"1 node with {_fmt(total)}"
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    return f"{len(nodes)} nodes with {_fmt(total)} in all (largest node: {_fmt(largest)})"


FIX = "lower --workers-per-trial, --cpus-per-worker or --gpus-per-worker, or add nodes that have them"


def check_trial_fits(base: dict[str, Any], in_actor: bool, *, local: bool) -> bool:
    """Refuse (``ValueError``) a trial the local Ray can never hold; on a cluster, warn. True if it fits now."""
    actor, workers = trial_bundles(base, in_actor)
    nodes = node_resources()
    if fits(actor, workers, nodes):
        return True
    demand, cluster = describe_demand(actor, workers), describe_cluster(nodes)
    message = f"Unschedulable trials: one trial needs {demand}, the cluster has {cluster}"
    if local:
        raise ValueError(f"{message}: {FIX}")
    logger.warning("%s; waiting up to %g s for the autoscaler (%s)", message, schedule_timeout(), SCHEDULE_TIMEOUT_ENV)
    return False


def schedule_timeout() -> float:
    """``PF_SWEEP_SCHEDULE_TIMEOUT_S`` (seconds; 0 or less: wait for ever), default 300."""
    raw = os.environ.get(SCHEDULE_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_SCHEDULE_TIMEOUT_S
    except ValueError:
        raise ValueError(f"Invalid {SCHEDULE_TIMEOUT_ENV}: {raw!r} (expected seconds, e.g. 300)") from None


def _matches(bundle: dict[str, Any], wanted: Bundle) -> bool:
    return all(math.isclose(float(bundle.get(key, 0.0)), amount, abs_tol=1e-6) for key, amount in wanted.items())


class ScheduleWatchdog(Callback):
    """Fails the sweep when its trials have waited ``timeout_s`` for resources with none training.

    A trial trains once a placement group of its trainer's shape (the Tune actor's for in-actor
    trials, the Train workers' otherwise) is created. Waiting: such a group is pending. The clock
    starts when trials wait and none trains, and restarts whenever one trains or reports; a sweep
    whose trials queue behind a running trial never trips it. Read from Ray's placement-group table
    every ``POLL_S`` seconds; raising here ends ``Tuner.fit`` (Tune has saved its state: resumable).
    """

    def __init__(self, base: dict[str, Any], in_actor: bool) -> None:
        actor, workers = trial_bundles(base, in_actor)
        self.actor, self.workers = actor, workers
        self.trainer = {"GPU": 0.0, **(workers[0] if workers else actor)}  # a CPU trainer holds no GPU
        self.timeout_s = DEFAULT_SCHEDULE_TIMEOUT_S
        self.waiting_since: float | None = None
        self.last_poll = 0.0

    def setup(self, **info: Any) -> None:
        # Read at every (re)start: a resumed sweep takes the environment of its resume.
        self.timeout_s = schedule_timeout()
        self.waiting_since, self.last_poll = None, 0.0

    def _progress(self, *args: Any, **info: Any) -> None:
        self.waiting_since = None

    on_trial_start = on_trial_result = on_trial_complete = on_trial_error = _progress

    def _state(self) -> tuple[bool, bool]:
        """(a trainer-shaped placement group is pending, one is created)."""
        from ray.util import placement_group_table

        waiting = training = False
        for group in placement_group_table().values():
            if not any(_matches(bundle, self.trainer) for bundle in group.get("bundles", {}).values()):
                continue
            state = group.get("state")
            training |= state == "CREATED"
            waiting |= state in ("PENDING", "RESCHEDULING")
        return waiting, training

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self.timeout_s <= 0 or now - self.last_poll < POLL_S:
            return
        self.last_poll = now
        waiting, training = self._state()
        if training:
            self.waiting_since = None
        elif waiting and self.waiting_since is None:
            self.waiting_since = now
        if self.waiting_since is not None and now - self.waiting_since > self.timeout_s:
            raise UnschedulableError(self.message(now - self.waiting_since))

    def message(self, waited_s: float) -> str:
        import ray

        free = {key: float(value) for key, value in ray.available_resources().items()}
        return (
            f"Unschedulable trials: none could start in {waited_s:.0f} s ({SCHEDULE_TIMEOUT_ENV}={self.timeout_s:g}); "
            f"one trial needs {describe_demand(self.actor, self.workers)}, the cluster has "
            f"{describe_cluster(node_resources())} (free now: {_fmt(free)}): {FIX}, or set {SCHEDULE_TIMEOUT_ENV} to wait longer"
        )
