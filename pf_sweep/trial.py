"""One trial: ``run_trial`` (the Python API) and ``fit`` (what a sweep's Tune trial calls).

On Ray, a trial is a Ray Train ``TorchTrainer`` with ``config.num_workers`` workers running
``pf_sweep.train.train_loop``; with ``local=True`` the same loop runs in this process.
Train runs are named deterministically (``trial-<hash of the config>`` unless given): Ray Train V2
resumes a run whose (storage_path, name) it has seen, so rerunning an interrupted trial with the
same name continues from its last checkpoint instead of starting over.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pf_sweep.checkpoint import METRICS_FILE
from pf_sweep.config import TrialConfig
from pf_sweep.divergence import as_diverged
from pf_sweep.preflight import auth_token_source, cluster_refuses_token, present_auth_token
from pf_sweep.storage import StoragePath

logger = logging.getLogger(__name__)

# Ray Train's controller polls workers every this many seconds and each report waits for a poll:
# the 2 s default made 20 reports cost 110 s instead of 33 s on a 2-CPU machine (docs/ray.md).
HEALTH_CHECK_INTERVAL_S = "0.1"


@dataclass
class TrialResult:
    """What a finished trial left: last metrics, one history row per report, latest checkpoint."""

    metrics: dict[str, float]
    history: pd.DataFrame
    checkpoint: str | None
    path: str | None = None
    config: TrialConfig | None = None


def default_name(cfg: TrialConfig) -> str:
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"trial-{digest}"


# Ray's switch for the platforms where it supports one machine only (Windows, macOS). Turned off, Ray
# takes 127.0.0.1 as the node's address, so every server of a local Ray (GCS, raylet, object manager,
# dashboard and its agents, workers) listens on loopback only. Ray reads it once, when it is imported.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def environ_while(name: str, value: str | None, *, override: bool = False):
    """``os.environ[name] = value`` for the block only, then the environment as it was. A value the
    user set is kept unless ``override``; ``value=None`` changes nothing."""
    previous = os.environ.get(name)
    if value is None or (previous is not None and not override):
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def import_ray_for_local_use() -> None:
    """Import Ray so that a local Ray started by this process listens on 127.0.0.1 only.

    It has to be the first import of Ray in the process: the CLI does it before anything else can,
    and every pf-sweep function that may start a local Ray does it before it imports Ray. A process
    that joins a cluster later still finds its node through the cluster's GCS, but an address written
    ``localhost:PORT`` then means 127.0.0.1. The switch is put back right after the import, so that
    processes started later (a ``ray start``, say) see the environment they would have; Ray's own
    workers take their address from the raylet. A value the user set is left alone.
    """
    if "ray" in sys.modules:
        return
    with environ_while(SINGLE_MACHINE_ENV, "0"):
        import ray  # noqa: F401


def set_ray_environment() -> None:
    """Environment that must be in place before Ray starts (it propagates to workers)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Tune saves the sweep's state (which trials exist, their status, the searcher) at the end of a
    # controller step once this many seconds have passed ("auto": 10 s or more). With any period, a trial
    # in a reused actor can be created and store an epoch between two saves (digits trials take under a
    # second); a driver killed then has forgotten a trial that trained, and --resume starts a new one
    # in its place. At 0 the step that creates a trial ends with a save, milliseconds later, while the
    # trial is still building its model. Cost: one save of 3-5 ms per step, about ten steps a second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # Ray Train's Prometheus metrics: two more callbacks per worker-group trial that nothing here reads.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")


def _join_hint(late: bool) -> str:
    source = auth_token_source()
    if late:  # Ray reads RAY_AUTH_MODE once, when it is imported
        return f"this process imported Ray before RAY_AUTH_MODE=token could be set for the token in {source}: export it first"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return f"check the address, and that the token in {source} is the cluster's (`ray get-auth-token` on its head)"
    return (
        "check the address; if the cluster uses token authentication, put its token (`ray get-auth-token` on its head) "
        "in ~/.ray/auth_token or a file named by RAY_AUTH_TOKEN_PATH"
    )


def _kill_local_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the local Ray this process started, just before Ray stops it.

    Ray 2.60's shutdown stops the GCS before the monitor, whose SIGTERM handler then tries to write
    an error to the dead GCS until Ray kills it after a 1 s grace: every local sweep, trial and test
    paid that second at exit. A local Ray's monitor has nothing left to do by then; SIGKILL skips its
    handler. Only a child of this process that monitors this process's Ray (by its GCS address) is
    touched, and Ray still reaps it.
    """
    import psutil
    import ray

    if not ray.is_initialized():
        return
    ours = f"--gcs-address={ray.get_runtime_context().gcs_address}"
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if ours in cmd and any("/ray/autoscaler/" in part and part.endswith("monitor.py") for part in cmd):
                child.kill()


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextlib.contextmanager
def _gloo_on_loopback():
    """While a local Ray starts (its processes keep the environment they start with): Gloo, the CPU
    process group of a worker group, on the loopback interface. Otherwise it listens on the address
    the host name resolves to, on many machines the LAN's. A value the user set is kept."""
    loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
    with environ_while("GLOO_SOCKET_IFNAME", loopback):
        yield


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, verbose: bool = True, dashboard: bool = True) -> None:
    """Join ``address`` (e.g. "auto" or "host:port"), or start a new local Ray sized to this machine.

    Without an address a new local instance is always started (``address="local"``), even where a
    cluster from ``ray start`` runs or left its address behind: joining it by accident would share
    its resources, and refuse ``num_cpus``. Joining presents this machine's auth token when it has one
    (``preflight.present_auth_token``, which must run before Ray is imported: Ray reads its auth mode
    then); a cluster that cannot be joined is a ``ValueError`` saying what to check.
    ``verbose=False`` keeps the workers' output and Ray's own info lines off the console; they stay in
    Ray's session logs. ``dashboard=False`` skips the dashboard, which only Ray Train worker groups
    need (their placement-group cleaner uses its State API); a sweep whose trials all run in their Tune
    actors starts faster without it. The dashboard's HTTP port (the Jobs API, which runs code) listens
    on 127.0.0.1 only, and so does everything else of a local Ray when Ray was first imported through
    ``import_ray_for_local_use`` (this does it when Ray is not imported yet); otherwise Ray's gRPC
    servers listen on every interface, behind Ray's token authentication, and a warning says so.
    """
    imported = "ray" in sys.modules
    late = bool(address) and present_auth_token() and imported
    if not address:
        import_ray_for_local_use()
    import ray

    if ray.is_initialized():
        return
    set_ray_environment()
    # Quiet: Ray's info lines and its notice that token authentication is on (it is, and stays on).
    quiet = {} if verbose else {"logging_level": logging.ERROR}
    if address:
        if cluster_refuses_token(address):  # at once, not after Ray's 20 s of retries
            hint = _join_hint(late)
            raise ValueError(f"Cannot join the Ray cluster at address={address!r}: it refuses this driver's token; {hint}")
        try:
            ray.init(address=address, log_to_driver=verbose, **quiet)
        except ConnectionError as err:
            hint = _join_hint(late)
            raise ValueError(f"Cannot join the Ray cluster at address={address!r}: {_first_line(err)}; {hint}") from None
        return
    if os.environ.get("RAY_ADDRESS"):
        logger.info("Starting a new local Ray (RAY_ADDRESS=%s is joined only with --address auto)", os.environ["RAY_ADDRESS"])
    if SINGLE_MACHINE_ENV not in os.environ and not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        logger.warning(
            "This local Ray's ports listen on every interface (behind Ray's token): Ray was imported before pf-sweep "
            "could keep it on 127.0.0.1; call pf-sweep first, or set %s=0 before Python starts",
            SINGLE_MACHINE_ENV,
        )
    # Ray Train's preemption watcher polls for nodes being drained (spot instances, a cluster scaling
    # down): a process per worker group that a machine's own Ray never needs. Clusters keep it.
    with _gloo_on_loopback(), environ_while(PREEMPTION_WATCHER_ENV, "0"):
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=verbose,
            **quiet,
        )
    # Runs before Ray's own exit handler, which ray registered when it was imported (atexit is LIFO).
    atexit.unregister(_kill_local_autoscaler_monitor)
    atexit.register(_kill_local_autoscaler_monitor)


def build_trainer(
    cfg: TrialConfig,
    *,
    storage_path: str,
    name: str,
    callbacks: Sequence[Any] = (),
    train_fn: Callable[[dict[str, Any]], None] | None = None,
):
    """The ``TorchTrainer`` for one trial; shared by ``run_trial`` and sweeps.

    ``train_fn`` replaces ``train_loop`` (it gets the config dict): a way to wrap the loop, e.g. to
    inject a worker failure in tests.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_fn or _worker_train_loop,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def _worker_train_loop(config: dict[str, Any]) -> None:
    """``train_loop``, imported on the worker: the process that builds the trainer (a sweep's trial
    actor) then never imports timm and the model code, about 1 s of CPU per trial saved here."""
    from pf_sweep.train import train_loop

    train_loop(config)


def checkpoint_location(checkpoint: Any) -> str:
    """A ``ray.train.Checkpoint`` as a local path or a URI (its ``.path`` alone drops the scheme)."""
    fs_type = checkpoint.filesystem.type_name
    if fs_type == "local":
        return checkpoint.path
    return f"{'gs' if fs_type == 'gcs' else fs_type}://{checkpoint.path}"


def _history(checkpoint: str | None, last: dict[str, float]) -> pd.DataFrame:
    """Every report: those stored with the latest checkpoint, plus the last one if it came later."""
    rows: list[dict[str, float]] = []
    if checkpoint is not None:
        metrics_file = StoragePath.of(checkpoint) / METRICS_FILE
        if metrics_file.exists():
            rows = json.loads(metrics_file.read_text())
    if last and (not rows or rows[-1].get("epoch") != last.get("epoch")):
        rows.append(last)
    return pd.DataFrame(rows)


def run_trial(
    config: TrialConfig,
    *,
    storage_path: str | None = "runs",
    name: str | None = None,
    local: bool = False,
    address: str | None = None,
    callbacks: Sequence[Any] = (),
) -> TrialResult:
    """Train one trial and return its ``TrialResult``.

    ``local=True`` runs ``train_loop`` in this process (no Ray; checkpoints under
    ``storage_path/name`` when ``storage_path`` is set). Otherwise a ``TorchTrainer`` with
    ``config.num_workers`` workers runs on the Ray cluster at ``address``, or on a local Ray that is
    started when none is running. ``callbacks`` are Ray Train ``UserCallback``s (Ray only).
    """
    from pf_sweep.preflight import check_trial

    check_trial(config, storage_path=storage_path, address=address, local=local)
    if not isinstance(config, TrialConfig):
        raise ValueError(f"run_trial needs a TrialConfig, got {type(config).__name__}")
    name = name or default_name(config)
    if local and callbacks:
        raise ValueError("callbacks are Ray Train callbacks: they need local=False")
    if local:
        from pf_sweep.train import run_local

        directory = Path(storage_path) / name if storage_path else None
        session = run_local(config, directory)
        return TrialResult(
            metrics=session.history[-1] if session.history else {},
            history=pd.DataFrame(session.history),
            checkpoint=session.checkpoint,
            path=str(directory) if directory else None,
            config=config,
        )
    if storage_path is None:
        raise ValueError("storage_path is required on Ray (checkpoints and metrics live there)")
    ensure_ray(address)
    trainer = build_trainer(config, storage_path=str(StoragePath.of(storage_path)), name=name, callbacks=callbacks)
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as err:  # Ray wraps a worker's TrainingDiverged: raise it as run_trial(local=True) does
        diverged = as_diverged(err)
        if diverged is None:
            raise
        raise diverged from None
    checkpoint = checkpoint_location(result.checkpoint) if result.checkpoint is not None else None
    return TrialResult(
        metrics=dict(result.metrics or {}),
        history=_history(checkpoint, dict(result.metrics or {})),
        checkpoint=checkpoint,
        path=str(result.path),
        config=config,
    )
