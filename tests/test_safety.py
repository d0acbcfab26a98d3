"""Safe by default: no checkpoint can run code, a local sweep listens on loopback only (torch's
rendezvous store of a worker group aside) and every port it opens refuses a job without the token,
and nothing secret or personal lands in what a sweep stores.

The bad-input table (a pickled-code ``pretrained_path`` refused before Ray, among others) lives with
the other refusals; here the payload is one that really runs code when unpickled, and the test
proves it never runs.
"""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pf_sweep import TrialConfig, run_trial

ROOT = Path(__file__).resolve().parents[1]
SECRET = "pf-test-secret-0c1b5e"  # what a real WANDB_API_KEY would be: it must never reach the disk


class _RunsCode:
    """Unpickling this runs ``exec``: what a malicious ``state.pt`` on shared storage would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


def _plant(directory: Path, marker: Path) -> Path:
    """A checkpoint folder whose state.pt runs code when loaded without weights_only."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _RunsCode(marker), "epoch": 0}, directory / "state.pt")
    (directory / "config.json").write_text(json.dumps(TrialConfig(model="pf_mlp").to_dict()))
    (directory / "metrics.json").write_text("[]")
    return directory


def _is_torch_load(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    return (
        isinstance(node, ast.Call)
        and isinstance(func, ast.Attribute)
        and func.attr == "load"
        and getattr(func.value, "id", "") == "torch"
    )


def test_every_torch_load_in_the_code_passes_weights_only_true():
    loads = []
    for path in [
        ROOT / "run_sweep.py",
        *ROOT.glob("pf_sweep/**/*.py"),
        *ROOT.glob("analysis/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if _is_torch_load(node):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                loads.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert loads, "found no torch.load at all: the scan is broken"
    assert [where for where, safe in loads if not safe] == []


def test_the_planted_payload_really_runs_code_when_unpickled(tmp_path):
    # The control: plain unpickling of the planted state.pt's pickle runs the payload, so the
    # refusals below mean something (torch.load without weights_only unpickles the same bytes).
    import zipfile

    marker = tmp_path / "ran"
    with zipfile.ZipFile(_plant(tmp_path / "ckpt", marker) / "state.pt") as archive:
        (data,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        pickle.loads(archive.read(data))
    assert marker.exists()


def test_a_pickled_code_pretrained_path_is_refused_and_never_runs(tmp_path):
    from pf_sweep.data import get_source
    from pf_sweep.models import build_model

    marker = tmp_path / "ran"
    ckpt = _plant(tmp_path / "ckpt", marker)
    with pytest.raises((pickle.UnpicklingError, ValueError), match=r"(?i)weights.only|pickle"):
        build_model(TrialConfig(model="pf_mlp", pretrained_path=str(ckpt)), get_source("digits").info(None))
    assert not marker.exists(), "the checkpoint's code ran"


def test_resuming_a_trial_from_a_pickled_code_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "t" / "checkpoint_000000", marker)
    cfg = TrialConfig(model="pf_mlp", epochs=2, train_split="train[:128]", batch_size=32)
    with pytest.raises(pickle.UnpicklingError, match=r"(?i)weights.only"):
        run_trial(cfg, local=True, storage_path=str(tmp_path), name="t")
    assert not marker.exists(), "the checkpoint's code ran"


# ------------------------------------------------------------------------------------ a local sweep
# Who a listening socket belongs to, from its process's command line (Ray renames its workers "ray::...").
_ROLES = (
    ("dashboard_agent", "dashboard/agent.py"),
    ("dashboard_agent", "ray::DashboardAgent"),
    ("runtime_env_agent", "ray::RuntimeEnvAgent"),
    ("train_worker", "ray::RayTrainWorker"),
    ("dashboard", "dashboard/dashboard.py"),
    ("runtime_env_agent", "runtime_env/agent/main.py"),
    ("gcs_server", "/gcs/gcs_server"),
    ("raylet", "/raylet/raylet"),
    ("worker", "default_worker.py"),
    ("worker", "ray::"),
    ("driver", "run_sweep.py"),
)
DASHBOARD_PORT = 8265  # Ray's default, which ensure_ray keeps


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (what a dual-stack socket bound to 127.0.0.1 shows)."""
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _role(proc) -> str:
    if proc.name() in ("gcs_server", "raylet"):  # the raylet's command line names default_worker.py too
        return proc.name()
    cmd = " ".join(proc.cmdline())
    return next((role for role, needle in _ROLES if needle in cmd), f"other:{proc.name()}")


def _titles(processes) -> set[str]:
    """The process titles Ray gives its actors (``ray::RayTrainWorker``...), of the processes still alive."""
    import psutil

    out = set()
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            out.add((proc.cmdline() or [""])[0])
    return out


def _listening(processes) -> set[tuple[str, int, str]]:
    """(address, port, role) of every listening TCP socket of these processes."""
    import psutil

    out = set()
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    out.add((conn.laddr.ip, conn.laddr.port, _role(proc)))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _submit_without_token(listening, marker: Path) -> dict[tuple[str, int, str], object]:
    """POST a job that would create ``marker`` to every listening port without a token, on Ray's Jobs
    API route (the dashboard's) and its job-agent route (the dashboard agent's): each answer's HTTP
    status, or the error a port that does not speak HTTP/1.1 (gRPC) gives."""
    import http.client
    import urllib.error
    import urllib.request

    body = json.dumps({"entrypoint": f"touch {marker}", "submission_id": "pf-unauthenticated"}).encode()
    headers = {"Content-Type": "application/json"}
    answers: dict[tuple[str, int, str], object] = {}
    for ip, port, _ in sorted(listening):
        host = "127.0.0.1" if ip in ("0.0.0.0", "::") else f"[{ip}]" if ":" in ip else ip
        for route in ("/api/jobs/", "/api/job_agent/jobs/"):
            request = urllib.request.Request(f"http://{host}:{port}{route}", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=2) as reply:
                    answers[(ip, port, route)] = reply.status
            except urllib.error.HTTPError as err:
                answers[(ip, port, route)] = err.code
            except (OSError, http.client.HTTPException) as err:
                answers[(ip, port, route)] = type(err).__name__
    return answers


def _auth_mode(processes) -> str | None:
    """RAY_AUTH_MODE in the environment of the GCS server, where Ray put it for the cluster it started."""
    import psutil

    for proc in processes:
        try:
            if proc.name() == "gcs_server":
                return proc.environ().get("RAY_AUTH_MODE")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _kill_all(driver: subprocess.Popen, seen) -> None:
    """SIGKILL the driver's process group and every process of its tree ever seen: Ray's workers run
    in process groups of their own, so without this a worker group went on training (and writing
    checkpoints) for a second after the "crash"."""
    import psutil

    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    for proc in seen:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(seen, timeout=30)


EXPECTED_ROLES = {"gcs_server", "raylet", "dashboard", "dashboard_agent", "train_worker"}


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """A local sweep of one worker-group trial (so the dashboard runs too), run with an API key and a
    HOME in its environment, SIGKILLed once it has checkpointed epoch 0. While it trained, every
    listening socket of the driver's process tree (the driver and the local Ray it started) was noted."""
    import psutil

    tmp_path = tmp_path_factory.mktemp("sweep")
    home, storage = tmp_path / "home", tmp_path / "store"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_API_KEY": SECRET, "HOME": str(home)}
    env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)  # pf-sweep's default decides
    args = ["--storage", str(storage), "--name", "safe", "--num-samples", "1", "--executor", "workers"]
    args += ["--set", "epochs=4", "--set", "train_split=train[:512]", "--max-failures", "0"]
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), *args]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    runs, listening, deadline = storage / "safe" / "runs", set(), time.monotonic() + 240
    seen: set[psutil.Process] = set()
    titles: set[str] = set()
    auth_mode, answers, marker, checkpointed = None, None, tmp_path / "job-ran", None
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            seen |= set(tree)
            titles |= _titles(tree)
            listening |= _listening(tree)
            auth_mode = auth_mode or _auth_mode(tree)
            roles = {role for _, _, role in listening}
            if answers is None and {"dashboard", "dashboard_agent"} <= roles:
                time.sleep(1.0)  # let the agent open its HTTP port too
                listening |= _listening(tree)
                answers = _submit_without_token(listening, marker)
            # Once Ray Train has recorded a checkpoint (its snapshot), not merely stored its files. Any: it
            # keeps the two newest, so a poll that came late never saw checkpoint_000000 there.
            if checkpointed is None and any(
                '"checkpoint_dir_name"' in p.read_text() for p in runs.glob("train-*/checkpoint_manager_snapshot.json")
            ):
                checkpointed = time.monotonic()
            # Then a few more scans, until every role the test expects was seen: a server that was slow
            # to open its port (or a scan that raced a process's start) is not taken for one that is absent.
            if checkpointed is not None and (roles >= EXPECTED_ROLES or time.monotonic() - checkpointed > 5.0):
                break
            time.sleep(0.2)
    finally:
        _kill_all(driver, seen)
    log.close()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    out = {"cmd": cmd, "env": env, "cwd": tmp_path, "home": home, "sweep_dir": storage / "safe", "listening": listening}
    time.sleep(2.0 if answers else 0.0)  # a job that was accepted would have run by now
    return {**out, "auth_mode": auth_mode, "answers": answers, "job_ran": marker.exists(), "titles": titles}


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_worker_group_sweep_listens_on_loopback_but_for_torchs_store_and_needs_a_token(interrupted_sweep):
    # Every Ray server (GCS, raylet, object manager, dashboard and agents, workers) is on loopback. The
    # one exception is torch's: the TCPStore that rank 0 of a Train worker group serves for the process
    # group's rendezvous binds to every interface, and torch has no option to change it.
    listening = interrupted_sweep["listening"]
    roles = {role for _, _, role in listening}
    assert roles >= EXPECTED_ROLES, f"the scan missed some: {listening}"
    # By port: a worker's process title turns from Ray's idle worker into RayTrainWorker while the scans
    # run, so one socket can be noted under both roles; it must have been a Train worker's.
    elsewhere = sorted((ip, port, role) for ip, port, role in listening if not _loopback(ip))
    train_ports = {port for _, port, role in listening if role == "train_worker"}
    assert {port for _, port, _ in elsewhere} <= train_ports, f"listening beyond loopback: {elsewhere}"
    assert len({port for _, port, _ in elsewhere}) <= 1, f"more than the one worker's store listens beyond loopback: {elsewhere}"
    http = {ip for ip, port, role in listening if role == "dashboard" and port == DASHBOARD_PORT}
    assert http == {"127.0.0.1"}, f"the dashboard's HTTP port is not on loopback alone: {sorted(listening)}"
    assert interrupted_sweep["auth_mode"] == "token", "the local cluster started without token authentication"
    assert (interrupted_sweep["home"] / ".ray" / "auth_token").read_text().strip(), "no token was generated"


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_worker_group_starts_no_preemption_watcher(interrupted_sweep):
    # Ray Train's watcher of drained nodes is a process per worker group; a machine's own Ray has no
    # nodes to drain, so pf-sweep turns it off there (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0).
    actors = {title.removeprefix("ray::").split(".")[0] for title in interrupted_sweep["titles"] if title.startswith("ray::")}
    assert {"RayTrainWorker", "TrainController"} <= actors, f"the scans missed the worker group: {sorted(actors)}"
    assert "PreemptionWatcher" not in actors, sorted(actors)


@pytest.mark.ray
def test_a_local_sweep_of_in_actor_trials_listens_on_loopback_only(tmp_path):
    """The default sweep: nothing of it, the driver included, can be reached from another machine."""
    import psutil

    args = ["--storage", str(tmp_path), "--name", "lo", "--num-samples", "1"]
    args += ["--set", "epochs=2", "--set", "train_split=train[:256]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), *args]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    listening: set[tuple[str, int, str]] = set()
    seen: set[psutil.Process] = set()
    deadline = time.monotonic() + 240
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
                seen |= set(tree)
                listening |= _listening(tree)
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            _kill_all(driver, seen)
    assert driver.returncode == 0
    roles = {role for _, _, role in listening}
    assert {"driver", "gcs_server", "raylet", "worker", "dashboard_agent"} <= roles, f"the scan missed some: {listening}"
    elsewhere = sorted((ip, port, role) for ip, port, role in listening if not _loopback(ip))
    assert not elsewhere, f"listening beyond loopback: {elsewhere}"


@pytest.mark.ray
@pytest.mark.slow
def test_every_port_of_a_local_sweep_refuses_a_job_without_the_token(interrupted_sweep):
    # What Ray leaves on every interface (gRPC, the agent's HTTP port, metrics) must not run code for
    # whoever reaches it: a job submitted without the token is refused on every listening port.
    answers = interrupted_sweep["answers"]
    assert answers, "the dashboard and its agent were never seen listening"
    accepted = {where: status for where, status in answers.items() if isinstance(status, int) and status < 300}
    assert not accepted, f"ports that accepted a job without the token: {accepted}"
    refused = {(ip, port) for (ip, port, _), status in answers.items() if status == 401}
    assert ("127.0.0.1", DASHBOARD_PORT) in refused, answers
    assert len(refused) >= 2, f"the dashboard agent's HTTP port did not ask for the token: {answers}"
    assert not interrupted_sweep["job_ran"], "an unauthenticated job ran"


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_stores_no_secret_nor_home_path(interrupted_sweep):
    sweep_dir, home = interrupted_sweep["sweep_dir"], interrupted_sweep["home"]
    stored = [sweep_dir / "sweep.json", *sweep_dir.glob("runs/*/checkpoint_*/config.json")]
    stored += list(sweep_dir.glob("trial-*/params.json"))
    assert len(stored) >= 3, stored
    for path in stored:
        text = path.read_text()
        assert str(home) not in text and os.path.expanduser("~") not in text, f"{path} holds a home path"
    for path in sweep_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"{path} holds the API key"


@pytest.mark.ray
@pytest.mark.slow
def test_resume_refuses_a_pickled_code_checkpoint_and_never_runs_it(interrupted_sweep):
    # The checkpoint a resume loads, the latest in Ray Train's snapshot of the interrupted run, is
    # replaced by one that runs code: `--resume` must refuse it.
    sweep_dir = interrupted_sweep["sweep_dir"]
    marker = interrupted_sweep["cwd"] / "ran"
    (snapshot,) = sweep_dir.glob("runs/train-*/checkpoint_manager_snapshot.json")
    latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert (snapshot.parent / latest).is_dir()
    for checkpoint in snapshot.parent.glob("checkpoint_0*"):  # whichever one the resume picks
        _plant(checkpoint, marker)
    cmd, env = interrupted_sweep["cmd"], interrupted_sweep["env"]
    proc = subprocess.run([*cmd, "--resume"], env=env, cwd=interrupted_sweep["cwd"], capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the checkpoint's code ran on --resume"
    errors = "".join(p.read_text() for p in sweep_dir.glob("trial-*/error.txt"))
    assert "GLOBAL exec" in errors or "weights_only" in errors.lower().replace(" ", "_"), (
        errors[-2000:] + proc.stdout[-2000:] + proc.stderr[-2000:]
    )
