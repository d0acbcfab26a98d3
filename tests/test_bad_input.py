"""Bad input is refused fast, clearly and before any Ray work: CLI exit 2, API ValueError, one message.

The CLI runs with a ``ray`` package that fails on import (proof that no Ray started) and each refusal
must take under 5 s; the Python API (``TrialConfig``, ``run_trial``, ``sweep.launch``) must raise
``ValueError`` naming the field and the value before Ray is joined or started.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_ray_path

import search_spaces
from pf_sweep import TrialConfig, preflight, run_trial, sweep
from pf_sweep.config import _own_models, _timm_models

ROOT = Path(__file__).resolve().parents[1]
REFUSAL_S = 5.0
CPUS = str(os.cpu_count())


class _Payload:
    """Pickled code: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints good and bad, a tripwire ``ray``, a directory this user cannot write, a closed port."""
    root = tmp_path_factory.mktemp("bad-input")
    good = root / "good.pt"
    torch.save({"weight": torch.zeros(2, 2)}, good)
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:-40])
    foreign = root / "foreign.npy"
    np.save(foreign, np.zeros(3))
    marker = root / "payload-ran"
    code = root / "code.pt"
    torch.save({"weight": _Payload(marker)}, code)
    if os.geteuid() == 0:  # root writes through any mode bits; procfs takes no new files from anyone
        locked = Path("/proc/self")
    else:
        locked = root / "locked"
        locked.mkdir(mode=0o500)
    no_tfds = root / "no-tfds"
    no_tfds.mkdir()
    not_a_sweep = root / "sweeps" / "half"
    not_a_sweep.mkdir(parents=True)
    (not_a_sweep / "sweep.json").write_text('{"base": {}, "settings": {}}')  # no Tune state beside it
    torn = root / "sweeps" / "torn"  # Tune's state cut short by a kill, and no staged copy on this machine
    torn.mkdir()
    (torn / "sweep.json").write_text('{"base": {}, "settings": {}}')
    (torn / "tuner.pkl").write_bytes(pickle.dumps({"settings": 1}))
    (torn / "experiment_state-2026-12-04_10-00-05.json").write_text('{"trial_data": [[{"trial_id": "a')
    (root / "empty-ray-tmp").mkdir()
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    return {
        "root": root,
        "good": good,
        "corrupt": corrupt,
        "foreign": foreign,
        "code": code,
        "marker": marker,
        "fake_ray": fake_ray_path(root),
        "locked": locked,
        "no_tfds": no_tfds,
        "closed": f"127.0.0.1:{closed_port}",
    }


# ------------------------------------------------------------------------------ the CLI

# (id, arguments with {placeholders} from `files`, extra environment, what the message must say)
CLI_CASES = [
    ("unknown-space", ["--space", "nope"], {}, "Unknown space"),
    ("unknown-model", ["--set", "model=resnet5000"], {}, "Invalid model: 'resnet5000'"),
    ("unknown-opt", ["--set", "opt=lion"], {}, "Invalid opt: 'lion'"),
    ("gsam-alpha-without-gsam", ["--set", "gsam_alpha=0.1"], {}, "Invalid gsam_alpha: 0.1 (only with method='gsam')"),
    ("malformed-set", ["--set", "rho"], {}, "Invalid --set 'rho' (expected FIELD=VALUE)"),
    ("unreadable-set-value", ["--set", "rho=abc"], {}, "Invalid rho: 'abc'"),
    ("set-a-searched-field", ["--set", "rho=0.1"], {}, "Invalid --set rho: space 'digits_cpu' searches it"),
    ("gpu-on-a-machine-without", ["--gpus-per-worker", "1"], {"CUDA_VISIBLE_DEVICES": ""}, "gpus_per_worker=1"),
    ("more-cpus-than-the-machine", ["--workers-per-trial", "2", "--cpus-per-worker", CPUS], {}, "Impossible resources"),
    ("storage-not-creatable", ["--storage", "/proc/forbidden/place"], {}, "Invalid --storage (storage_path): '/proc/forbidden"),
    ("storage-not-writable", ["--storage", "{locked}"], {}, "cannot write in"),
    ("tfds-not-prepared", ["--set", "dataset=tfds/cifar10", "--set", "data_dir={no_tfds}"], {}, "prepare cifar10 --data-dir"),
    ("pretrained-pickled-code", ["--set", "pretrained_path={code}"], {}, "it pickles code or objects (posix.system)"),
    ("resume-of-a-non-sweep", ["--storage", "{root}/sweeps", "--name", "half", "--resume"], {}, "No restorable sweep"),
    (
        "resume-of-a-torn-state",
        ["--storage", "{root}/sweeps", "--name", "torn", "--resume"],
        {"RAY_TMPDIR": "{root}/empty-ray-tmp"},
        "json in {root}/sweeps/torn is incomplete: the sweep's driver was killed while Tune copied it, and no complete "
        "staged copy was found under {root}/empty-ray-tmp/ray/session_*/artifacts/*/torn/driver_artifacts",
    ),
    ("address-unreachable", ["--address", "{closed}"], {}, "Invalid --address (address): '{closed}' (nothing answers"),
]


@dataclass
class Refusal:
    returncode: int
    stderr: str
    wall_s: float
    cpu_s: float  # the CLI process's own user + system time
    storage: Path


def _run_cli(case, files) -> Refusal:
    _, args, extra_env, _ = case
    storage = Path(tempfile.mkdtemp(dir=files["root"])) / "store"
    args = [a.format(**files) for a in args]
    if "--storage" not in args:
        args = ["--storage", str(storage), *args]
    env = {**os.environ, **{k: v.format(**files) for k, v in extra_env.items()}}
    env["PYTHONPATH"] = os.pathsep.join([str(files["fake_ray"]), str(ROOT)])
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_sweep.py"), *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=storage.parent,
        )
        killer = threading.Timer(60, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, whatever else runs in parallel
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        return Refusal(proc.returncode, err.read(), wall, usage.ru_utime + usage.ru_stime, storage)


@pytest.fixture(scope="module")
def cli_results(files):
    """Every CLI case, two at a time (this machine has 2 cores): {id: Refusal}."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip([c[0] for c in CLI_CASES], pool.map(lambda c: _run_cli(c, files), CLI_CASES), strict=True))
    slowest = max(results, key=lambda k: results[k].wall_s)
    print(f"\nslowest CLI refusal: {slowest}, {results[slowest].wall_s:.2f} s wall, {results[slowest].cpu_s:.2f} s CPU")
    return results


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input_with_exit_2_one_line_and_no_ray(case, cli_results, files):
    result = cli_results[case[0]]
    assert result.returncode == 2, result.stderr
    assert case[3].format(**files) in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one message, no traceback, no "ray" import (tripwire)
    # The work a refusal does; wall time on this shared 2-core machine also counts other jobs' turns.
    assert result.cpu_s < REFUSAL_S, f"refused after {result.cpu_s:.1f} s of CPU"
    assert result.wall_s < 3 * REFUSAL_S, f"refused after {result.wall_s:.1f} s"
    assert not result.storage.exists()
    assert not files["marker"].exists()


# ------------------------------------------------------------------------------ TrialConfig

CONFIG_CASES = [
    ({"dataset": "imagenet"}, r"Invalid dataset: 'imagenet'"),
    ({"model": "resnet5000"}, r"Invalid model: 'resnet5000' \(neither a timm model .*did you mean 'resnet50'\?"),
    ({"model": "pf_mlpp"}, r"Invalid model: 'pf_mlpp' .*pf_cnn_small, pf_cnn_tiny, pf_mlp"),
    ({"opt": "lion"}, r"Invalid opt: 'lion' \(allowed: sgd,"),
    ({"sched": "cyclic"}, r"Invalid sched: 'cyclic'"),
    ({"loss": "mse"}, r"Invalid loss: 'mse'"),
    (
        {"batch_size": 60, "sharpness_m": 32},
        r"Invalid sharpness_m: 32 \(must be a positive divisor of the per-worker batch_size 60",
    ),
    ({"rho": -0.1}, r"Invalid rho: -0.1 \(must be >= 0\)"),
    ({"perturbation": "obf", "obf_C": 0.5}, r"Invalid obf_C: 0.5"),
    ({"perturbation": "obf", "obf_gamma": 1.5}, r"Invalid obf_gamma: 1.5 \(must be in \[0, 1\]\)"),
    ({"gsam_alpha": 0.1}, r"Invalid gsam_alpha: 0.1 \(only with method='gsam'\)"),
]


@pytest.mark.parametrize(("fields", "message"), CONFIG_CASES, ids=["-".join(map(str, f.values())) for f, _ in CONFIG_CASES])
def test_trial_config_refuses_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        TrialConfig(**fields)


def test_model_names_of_timm_and_ours_are_accepted_with_or_without_a_pretrained_tag():
    for name in ("pf_mlp", "pf_cnn_tiny", "resnet18", "vit_tiny_patch16_224", "resnet50.a1_in1k"):
        assert TrialConfig(model=name).model == name


def test_the_model_names_read_from_timms_sources_are_its_registry():
    import timm

    import pf_sweep.models  # noqa: F401 - registers ours with timm

    names = _timm_models()
    assert set(timm.list_models()) - names == set(_own_models())
    assert all(timm.is_model(name) for name in names)  # the rest are deprecated names timm still builds


def test_checking_names_and_checkpoints_imports_neither_torch_nor_timm(files):
    code = (
        "import sys; from pf_sweep import TrialConfig, preflight; TrialConfig(model='resnet50');"
        f"preflight.check_pretrained({str(files['good'])!r}, on_cluster=False);"
        "print(sorted({'torch', 'timm', 'ray'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


# ------------------------------------------------------------------------------ run_trial and launch


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to join or start Ray, or to build a trainer, fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray work started")

    for target in ("pf_sweep.trial.ensure_ray", "pf_sweep.trial.build_trainer", "pf_sweep.sweep.ensure_sweep_ray"):
        monkeypatch.setattr(target, refuse)
    monkeypatch.setattr("pf_sweep.train.run_local", refuse)


# (id, TrialConfig fields, run_trial keywords with {placeholders}, extra environment, message regex)
API_CASES = [
    ("gpu-without-gpus", {"use_gpu": True}, {}, {"CUDA_VISIBLE_DEVICES": ""}, r"gpus_per_worker=1 .*this machine has no GPU"),
    ("gpu-in-process-without-gpus", {"use_gpu": True}, {"local": True}, {"CUDA_VISIBLE_DEVICES": ""}, r"this machine has no GPU"),
    ("more-cpus-than-here", {"num_workers": 2, "cpus_per_worker": float(CPUS)}, {}, {}, r"Impossible resources: one trial"),
    ("storage-not-creatable", {}, {"storage_path": "/proc/forbidden/place"}, {}, r"Invalid storage_path: '/proc/forbidden/"),
    ("storage-not-writable", {}, {"storage_path": "{locked}"}, {}, r"Invalid storage_path: .*cannot write in"),
    ("tfds-not-prepared", {"dataset": "tfds/cifar10", "data_dir": "{no_tfds}"}, {}, {}, r"Invalid dataset: .*prepare cifar10"),
    ("pretrained-missing", {"pretrained_path": "{root}/nothing.pt"}, {}, {}, r"Invalid pretrained_path: .*does not exist"),
    ("pretrained-corrupt", {"pretrained_path": "{corrupt}"}, {}, {}, r"Invalid pretrained_path: .*damaged zip"),
    ("pretrained-foreign", {"pretrained_path": "{foreign}"}, {}, {}, r"Invalid pretrained_path: .*NumPy"),
    ("pretrained-code", {"pretrained_path": "{code}"}, {"local": True}, {}, r"Invalid pretrained_path: .*pickles code"),
    ("address-unreachable", {}, {"address": "{closed}"}, {}, r"Invalid address: '127\.0\.0\.1:\d+' \(nothing answers"),
]


def _fill(mapping: dict, files: dict) -> dict:
    return {k: v.format(**files) if isinstance(v, str) else v for k, v in mapping.items()}


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_run_trial_refuses_bad_input_before_ray(case, files, no_ray, monkeypatch, tmp_path):
    _, fields, kwargs, env, message = case
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = TrialConfig(**_fill({"dataset": "digits", "model": "pf_mlp", "epochs": 1, **fields}, files))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        run_trial(cfg, **{"storage_path": str(tmp_path / "runs"), **_fill(kwargs, files)})
    assert time.perf_counter() - start < REFUSAL_S
    assert not (tmp_path / "runs").exists()
    assert not files["marker"].exists()


LAUNCH_CASES = [
    ("gpu-without-gpus", {"gpus_per_worker": 1.0}, {}, {"CUDA_VISIBLE_DEVICES": ""}, r"this machine has no GPU"),
    ("unknown-model", {"overrides": {"model": "resnet5000"}}, {}, {}, r"Invalid model: 'resnet5000'"),
    ("set-searched-fields", {"overrides": {"lr": 0.1, "sharpness_m": 8}}, {}, {}, r"--set lr, sharpness_m: .* searches them"),
    ("storage-not-creatable", {}, {"storage_path": "/proc/forbidden/place"}, {}, r"'/proc/forbidden/place' \(cannot create"),
    ("pretrained-code", {"overrides": {"pretrained_path": "{code}"}}, {}, {}, r"Invalid pretrained_path: .*pickles code"),
    ("address-unreachable", {}, {"address": "{closed}"}, {}, r"Invalid --address \(address\): .*nothing answers"),
]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_launch_refuses_bad_input_before_ray(case, files, no_ray, monkeypatch, tmp_path):
    _, settings_fields, kwargs, env, message = case
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fields = {**settings_fields, "overrides": _fill(settings_fields.get("overrides", {}), files)}
    settings = sweep.SweepSettings(num_samples=2, max_concurrent=1, **fields)
    space = search_spaces.get("digits_cpu")
    with pytest.raises(ValueError, match=message):
        sweep.launch(space, settings, **{"storage_path": str(tmp_path / "store"), "name": "s", **_fill(kwargs, files)})
    assert not (tmp_path / "store").exists()
    assert not files["marker"].exists()


# ------------------------------------------------------------------------------ preflight details


def test_more_gpus_than_the_machine_has_are_refused_and_as_many_accepted(monkeypatch):
    monkeypatch.setattr(preflight, "_nvidia_gpus", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    preflight.check_local_resources(2, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"asks for 4 GPU\(s\) per trial, this machine has 2 GPU\(s\)"):
        preflight.check_local_resources(2, 0.5, 2.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert preflight.local_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES='-1' hides them"):
        preflight.check_local_resources(1, 1.0, 1.0)


def test_a_checkpoint_holding_a_whole_model_or_no_state_dict_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save(model, tmp_path / "model.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    torch.save({"epochs": 3, "name": "x"}, tmp_path / "nothing.pt")
    (tmp_path / "run" / "checkpoint_000001").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "run" / "checkpoint_000001" / "state.pt")
    with pytest.raises(ValueError, match=r"pickles code or objects \(torch\.nn\.modules\.linear\.Linear\)"):
        preflight.check_pretrained(str(tmp_path / "model.pt"), on_cluster=False)
    with pytest.raises(ValueError, match=r"it holds a list, not a state dict"):
        preflight.check_pretrained(str(tmp_path / "list.pt"), on_cluster=False)
    with pytest.raises(ValueError, match=r"it holds no tensors"):
        preflight.check_pretrained(str(tmp_path / "nothing.pt"), on_cluster=False)
    preflight.check_pretrained(str(tmp_path / "run" / "checkpoint_000001"), on_cluster=False)  # a checkpoint directory


def test_a_sweep_json_that_is_not_pf_sweeps_is_refused_by_the_one_reader_of_sweeps(tmp_path):
    from pf_sweep.storage import StoragePath

    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Not a sweep: .*sweep\.json cannot be read as JSON"):
        sweep.read_sweep(str(tmp_path))
    (tmp_path / "sweep.json").write_text('{"base": {}}')
    with pytest.raises(ValueError, match=r"lacks pf-sweep's 'base' and 'settings'"):
        preflight.read_resumable(StoragePath.of(tmp_path))
    (tmp_path / "sweep.json").write_text('{"base": {}, "settings": {}, "space": "default"}')
    assert sweep.read_sweep(str(tmp_path))["space"] == "default"
    with pytest.raises(ValueError, match=r"Tune saved no tuner\.pkl there"):
        preflight.read_resumable(StoragePath.of(tmp_path))
    with pytest.raises(ValueError, match=r"No sweep at .*missing \(it has no sweep\.json\)"):
        sweep.read_sweep(str(tmp_path / "missing"))


def test_auto_is_read_through_ray_address_by_both_cluster_checks(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    preflight.check_address("auto")  # Ray finds the cluster itself: nothing to check
    assert not preflight.cluster_refuses_token("auto")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", closed)
    with pytest.raises(ValueError, match=r"Invalid RAY_ADDRESS \(used by --address auto\): .*nothing answers"):
        preflight.check_address("auto")
    assert not preflight.cluster_refuses_token("auto")  # nothing answers: no refusal, ray.init decides


def test_a_missing_checkpoint_or_dataset_on_a_cluster_is_a_warning(files):
    warnings: list[str] = []
    preflight.check_pretrained(str(files["root"] / "on-the-nodes.pt"), on_cluster=True, warn=warnings.append)
    cfg = TrialConfig(dataset="tfds/cifar10", data_dir=str(files["no_tfds"]))
    preflight.check_datasets([cfg], on_cluster=True, warn=warnings.append)
    assert len(warnings) == 2 and all("the cluster's workers may see it" in w for w in warnings)


def test_the_dashboard_port_given_as_the_address_is_refused(tmp_path):
    import http.server

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ValueError, match=r"a web server answers there, not Ray: the dashboard's port\?"):
            preflight.check_address(f"127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_a_grpc_server_passes_the_address_check():
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        preflight.check_address(f"127.0.0.1:{port}")
        preflight.check_address(f"ray://127.0.0.1:{port}")
    finally:
        server.stop(0)


# ------------------------------------------------------------------------------ joining a cluster: the auth token


@pytest.fixture
def auth_env(monkeypatch, tmp_path):
    """A home without a token and no Ray auth variables (restored afterwards)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "x")  # recorded, so that the teardown restores the original state
        monkeypatch.delenv(name)
    return tmp_path


def test_a_token_at_hand_is_presented_when_joining(auth_env, monkeypatch):
    from pf_sweep.preflight import present_auth_token

    present_auth_token()
    assert "RAY_AUTH_MODE" not in os.environ  # no token: nothing to present
    (auth_env / ".ray").mkdir()
    (auth_env / ".ray" / "auth_token").write_text("secret")
    present_auth_token()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    present_auth_token()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands


def test_a_token_path_from_the_environment_is_presented(auth_env, monkeypatch):
    from pf_sweep.preflight import auth_token_source, present_auth_token

    token = auth_env / "cluster-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    present_auth_token()
    assert "RAY_AUTH_MODE" not in os.environ  # the path names no file yet
    token.write_text("secret")
    present_auth_token()
    assert os.environ["RAY_AUTH_MODE"] == "token" and auth_token_source() == str(token)


def _unjoinable_ray(monkeypatch) -> None:
    import types

    def init(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379\nmore lines")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False, init=init))


def test_a_cluster_that_cannot_be_joined_is_one_valueerror_saying_what_to_set(auth_env, monkeypatch):
    from pf_sweep.trial import ensure_ray

    _unjoinable_ray(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"^Cannot join the Ray cluster at address='10\.0\.0\.5:6379': Failed to connect .*6379; .*"
        r"put its token .* in ~/\.ray/auth_token or a file named by RAY_AUTH_TOKEN_PATH$",
    ):
        ensure_ray("10.0.0.5:6379", verbose=False)


def test_a_token_found_after_ray_was_imported_is_named_in_the_refusal(auth_env, monkeypatch):
    from pf_sweep.trial import ensure_ray

    (auth_env / ".ray").mkdir()
    (auth_env / ".ray" / "auth_token").write_text("secret")
    _unjoinable_ray(monkeypatch)  # Ray already imported: it read RAY_AUTH_MODE (unset) then
    with pytest.raises(ValueError, match=r"imported Ray before RAY_AUTH_MODE=token could be set .*auth_token: export it first$"):
        ensure_ray("10.0.0.5:6379", verbose=False)


# ------------------------------------------------------------------------------ real Ray: a local start never joins


@pytest.fixture
def short_tmp():
    """A directory with a short path (Ray's socket paths must stay short), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.ray
def test_without_an_address_a_new_local_ray_starts_whatever_address_is_left_behind(short_tmp):
    """Another cluster's address in RAY_ADDRESS and in Ray's temp dir (a `ray start` killed without `ray stop`)."""
    tmp = short_tmp
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    code = (
        "import ray; from pf_sweep.trial import ensure_ray; ensure_ray(num_cpus=1, verbose=False, dashboard=False);"
        "print(ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() and not proc.stdout.strip().endswith(":9")


@pytest.mark.ray
@pytest.mark.slow
def test_joining_a_token_cluster_presents_the_token_without_ray_auth_mode(tmp_path, short_tmp):
    """`ray start --head` where ~/.ray/auth_token exists turns token auth on; a driver that did not
    set RAY_AUTH_MODE retried for 20 s and failed. It must join at once."""
    home, tmp = tmp_path / "home", short_tmp
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0123456789abcdef" * 4)
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={ports[0]}",
         f"--ray-client-server-port={ports[1]}", f"--dashboard-port={ports[2]}", "--include-dashboard=false",
         f"--temp-dir={tmp}", "--num-cpus=1", "--node-ip-address=127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the GCS port answers once the head is up
            try:
                preflight.check_address(f"127.0.0.1:{ports[0]}")
                break
            except ValueError:
                time.sleep(1)
        code = (  # Ray imported by ensure_ray itself, as in run_sweep.py, after the token mode is set
            "import sys, time; from pf_sweep.trial import ensure_ray; t = time.time(); ensure_ray(sys.argv[1], verbose=False);"
            "import ray; print(ray.cluster_resources().get('CPU'), time.time() - t)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, f"127.0.0.1:{ports[0]}"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        cpus, seconds = proc.stdout.split()
        assert float(cpus) >= 1 and float(seconds) < 15
        # A driver with the wrong token, or with none, is refused in one line at once (Ray retried for 20 s).
        refuse = "import sys, time; from pf_sweep.trial import ensure_ray; ensure_ray(sys.argv[1], verbose=False)"
        (tmp_path / "wrong").write_text("f" * 64)
        for extra in ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")}, {"HOME": str(tmp_path)}):
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-c", refuse, f"127.0.0.1:{ports[0]}"],
                capture_output=True, text=True, timeout=120, cwd=ROOT, env={**env, **extra},
            )  # fmt: skip
            took = time.monotonic() - started
            assert proc.returncode != 0 and "refuses this driver's token" in proc.stderr, proc.stderr[-2000:]
            assert took < 5, f"{took:.1f} s"  # the process start and imports included
    finally:  # the head's processes share its process group; `ray stop` would stop every Ray on the machine
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
