"""Checks that refuse a trial or a sweep before any Ray work, each with one ``ValueError``.

``TrialConfig`` validates values; what it cannot see is the world they meet: a storage that cannot
be written, GPUs or CPUs this machine lacks, a TFDS dataset not prepared, a ``pretrained_path`` that
is missing or is not a file of weights, a cluster address nothing answers at, a ``--resume`` of
something that is not a sweep. Found late, each of these failed after Ray had started, on a worker,
or never (a trial asking for a GPU the machine lacks waited forever).

Everything runs in the driver, which never imports torch or Ray: the GPU count comes from the
NVIDIA driver's files, a checkpoint's pickle is read with ``pickletools`` (nothing it names runs;
where torch is already loaded, the file is also loaded with ``weights_only=True``), a cluster is
probed with one TCP connect. ``run_trial``, ``sweep.launch`` and ``run_sweep.py`` call
``check_trial`` / ``check_sweep``. ``present_auth_token`` readies the driver's token for a cluster,
and must run before Ray is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pickletools
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pf_sweep.tune_state import TUNER_STATE, mend_torn_state  # TUNER_STATE: what Tuner.can_restore looks for

logger = logging.getLogger(__name__)

Warn = Callable[[str], None]
ADDRESS_TIMEOUT_S = 2.0  # a cluster's GCS port answers a TCP connect in milliseconds


# ---------------------------------------------------------------------- storage
def check_storage(location: str, *, field: str = "storage") -> None:
    """A local storage directory must be creatable and writable; what this check creates it removes.

    Object storage (``s3://``, ``gs://``) is left to Ray and pyarrow, which hold its credentials.
    """
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return
    path = Path(text.removeprefix("file://")).expanduser().absolute()
    created: list[Path] = []
    action, target = "create", path
    try:
        missing = path
        while not missing.exists():
            created.append(missing)
            missing = missing.parent
        for directory in reversed(created):
            target = directory
            directory.mkdir()
        action, target = "write in", path
        if not path.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(path))
        fd, probe = tempfile.mkstemp(prefix=".pf-sweep-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(
            f"Invalid {field}: {text!r} (cannot {action} {err.filename or target}: {reason}); "
            "give a directory this user can create and write"
        ) from None
    finally:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


# ---------------------------------------------------------------------- this machine's resources
def _nvidia_gpus() -> int:
    """NVIDIA GPUs the driver shows: its /proc entries, else ``nvidia-smi -L``; 0 without a driver."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        count = sum(1 for _ in proc.iterdir())
        if count:
            return count
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def local_gpus() -> int:
    """GPUs a local Ray would find here: the NVIDIA ones, narrowed by ``CUDA_VISIBLE_DEVICES`` as Ray does."""
    found = _nvidia_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    ids = [part for part in visible.split(",") if part.strip()]
    if visible.strip() in ("", "NoDevFiles") or (ids and ids[0].strip() == "-1"):
        return 0
    return min(found, len(ids))


def ray_running() -> bool:
    """Whether this process already joined a Ray (then its resources, not this machine's, decide)."""
    ray = sys.modules.get("ray")
    return ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()


def check_local_resources(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, *, in_process: bool = False) -> None:
    """One trial must fit on this machine: its workers' CPUs, and any GPU it asks for.

    ``gpus_per_worker`` is 0 for a CPU trial. ``in_process``: ``run_trial(local=True)``, which needs
    no CPUs from Ray but still a GPU for ``use_gpu``.
    """
    cpus = os.cpu_count() or 1
    need = num_workers * cpus_per_worker
    if not in_process and need > cpus:
        raise ValueError(
            f"Impossible resources: one trial needs {num_workers} worker(s) x {cpus_per_worker:g} CPUs = {need:g} CPUs, "
            f"this machine has {cpus}; lower --workers-per-trial/--cpus-per-worker (num_workers/cpus_per_worker) "
            "or join a cluster with --address"
        )
    if gpus_per_worker <= 0:
        return
    gpus = local_gpus()
    need_gpus = (1 if in_process else num_workers) * gpus_per_worker
    if need_gpus > gpus:
        have = f"{gpus} GPU(s)" if gpus else f"no GPU ({_gpu_evidence()})"
        raise ValueError(
            f"Impossible resources: gpus_per_worker={gpus_per_worker:g} (--gpus-per-worker, use_gpu) asks for {need_gpus:g} "
            f"GPU(s) per trial, this machine has {have}; drop it (use_gpu=False) or join a GPU cluster with --address"
        )


def _gpu_evidence() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and _nvidia_gpus():
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides them"
    return "no NVIDIA driver: /proc/driver/nvidia/gpus and nvidia-smi -L list none"


# ---------------------------------------------------------------------- data
@functools.cache
def _dataset_problem(dataset: str, data_dir: str | None) -> str | None:
    from pf_sweep.data import get_source

    try:
        get_source(dataset).info(data_dir)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def check_datasets(configs: Iterable[Any], *, on_cluster: bool, warn: Warn = logger.warning) -> None:
    """TFDS datasets must be prepared before any trial starts (not discovered by every trial in turn).

    On a cluster the data may live only where the workers run: one this machine cannot see is a
    warning there, an error locally.
    """
    configs = list(configs)
    needed = {(c.dataset, c.data_dir) for c in configs} | {(d, c.data_dir) for c in configs for d, _ in c.eval_sets}
    if any(c.eval_suite for c in configs):
        from pf_sweep.evaluate import SUITES

        needed |= {(s.dataset, c.data_dir) for c in configs if c.eval_suite for s in SUITES[c.eval_suite]}
    for dataset, data_dir in sorted(needed, key=str):
        if not dataset.startswith("tfds/"):
            continue
        problem = _dataset_problem(dataset, data_dir)
        if problem is None:
            continue
        if not on_cluster:
            raise ValueError(f"Invalid dataset: {problem}")
        warn(f"{problem} (continuing: the cluster's workers may see it)")


# ---------------------------------------------------------------------- pretrained weights
# What the pickle of a state dict saved by torch.save refers to. Anything else is code, or an object
# loading would have to construct (a whole pickled model, a payload); torch.nn.modules.* is a model.
_WEIGHTS_MODULES = ("torch", "collections", "_codecs", "numpy")
_WEIGHTS_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "slice", "complex", "int", "float", "bool", "str"}
_MODEL_MODULES = "torch.nn.modules."
_TENSOR_REBUILDERS = "torch._utils._rebuild_"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-zip torch.save file
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_BOOKKEEPING_OPS = {"PROTO", "FRAME", "MARK", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_FIX = "give a checkpoint directory, its state.pt, or a file saved by torch.save(model.state_dict(), path)"


@dataclass
class PickleScan:
    """What a pickle would build, read by ``pickletools`` (nothing in it runs)."""

    globals: set[str] = dataclasses.field(default_factory=set)  # every module.name it would import
    first: tuple[str, Any] = ("", None)  # the opcode (and argument) of the first object it pushes


def scan_pickle(data: bytes | BinaryIO) -> PickleScan:
    """Globals and top-level object of one pickle; ``ValueError`` for bytes that are not a pickle."""
    scan = PickleScan()
    strings: list[str] = []  # strings pushed so far: STACK_GLOBAL takes its module and name from the last two
    memo: dict[int, str | None] = {}
    top: str | None = None
    for op, arg, _ in pickletools.genops(data):
        if not scan.first[0] and op.name not in _BOOKKEEPING_OPS:
            scan.first = (op.name, arg)
        if op.name in ("GLOBAL", "INST"):
            scan.globals.add(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            scan.globals.add(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
        if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = top
            continue  # the stack's top is unchanged
        top = arg if op.name in _STRING_OPS and isinstance(arg, str) else None
        if op.name in ("GET", "BINGET", "LONG_BINGET"):
            top = memo.get(int(arg))
        if top is not None:
            strings.append(top)
    return scan


def _not_weights(scan: PickleScan) -> str | None:
    """Why a checkpoint's pickle is not a state dict of tensors, or None."""

    def allowed(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        if module in ("builtins", "__builtin__"):  # protocol 2 pickles name it as Python 2 did
            return attr in _WEIGHTS_BUILTINS
        if name.startswith(_MODEL_MODULES):
            return False
        return any(module == m or module.startswith(m + ".") for m in _WEIGHTS_MODULES)

    foreign = sorted(name for name in scan.globals if not allowed(name))
    if foreign:
        return (
            f"it pickles code or objects ({', '.join(foreign[:3])}), which pf-sweep never loads; "
            "save the weights alone: torch.save(model.state_dict(), path)"
        )
    op, arg = scan.first
    if op == "LONG1" and arg == _LEGACY_MAGIC:
        return None  # a legacy file: the weights-only load in the worker decides
    if op not in ("EMPTY_DICT", "DICT") and not (op in ("GLOBAL", "STACK_GLOBAL") and "collections.OrderedDict" in scan.globals):
        kind = {"EMPTY_LIST": "list", "LIST": "list", "EMPTY_TUPLE": "tuple", "TUPLE": "tuple"}.get(op, f"{op} value")
        return f"it holds a {kind}, not a state dict"
    if not any(name.startswith(_TENSOR_REBUILDERS) for name in scan.globals):
        return "it holds no tensors, so no weights"
    return None


def _checkpoint_pickle(path: Path) -> PickleScan:
    """The scan of the pickle a torch checkpoint holds: ``*/data.pkl`` of its zip, or a legacy file's first.

    Raises ``ValueError`` saying what the file is instead.
    """
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError("it is empty")
    if head.startswith(b"\x93NUMPY"):
        raise ValueError("it is a NumPy .npy array, not a PyTorch checkpoint")
    if head.startswith(b"\x89HDF"):
        raise ValueError("it is an HDF5 (Keras) file, not a PyTorch checkpoint")
    if head[8:10] == b'{"':
        raise ValueError("it looks like a safetensors file; pf-sweep loads torch.save checkpoints")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise ValueError("it is a zip archive without data.pkl, not a PyTorch checkpoint")
            return scan_pickle(archive.read(pickles[0]))
    if head.startswith(b"PK"):
        raise ValueError("it is a damaged zip: truncated or corrupt (no central directory)")
    if not head.startswith(b"\x80"):
        raise ValueError("it is not a pickle (no protocol header), so not a PyTorch checkpoint")
    with path.open("rb") as f:  # genops stops at the first pickle's STOP: a large file is not read whole
        return scan_pickle(f)


def weights_verdict(path: str) -> str | None:
    """Load ``path`` as the workers will, ``torch.load(weights_only=True)``: None, or why it is not weights.

    Only where torch is already imported: the driver never imports it.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError... for bad files
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else repr(err))
        return f"torch.load(weights_only=True) refuses it: {reason[:200]}"
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(value, torch.Tensor) for value in state.values()):
        return f"it holds a {type(state).__name__} without tensors, not a state dict"
    return None


@functools.cache
def _pretrained_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """Why ``path`` is not a file of weights, or None (cached per file version: a sweep checks once)."""
    try:
        problem = _not_weights(_checkpoint_pickle(Path(path)))
    except (ValueError, zipfile.BadZipFile) as err:  # pickletools raises ValueError on bytes that are no pickle
        return str(err) if str(err).startswith("it ") else f"it is corrupt or not a pickle ({err})"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if problem is None and "torch" in sys.modules:  # torch is already paid for here: load it as the workers will
        problem = weights_verdict(path)
    return problem


def check_pretrained(path: str | None, *, on_cluster: bool, warn: Warn = logger.warning) -> None:
    """``pretrained_path`` must be a readable file of weights (a checkpoint directory: its ``state.pt``).

    Whether the tensors fit the model is checked when a worker builds it (``models.load_pretrained``).
    """
    if not path:
        return
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "state.pt"
    if not file.is_file():
        problem = f"Invalid pretrained_path: {path!r} ({file} does not exist; {_FIX})"
        if not on_cluster:
            raise ValueError(problem)
        warn(f"{problem} (continuing: the cluster's workers may see it)")
        return
    stat = file.stat()
    problem = _pretrained_problem(str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if problem is not None:
        raise ValueError(f"Invalid pretrained_path: {path!r} ({problem}; {_FIX})")


# ---------------------------------------------------------------------- cluster address
def _named_address(address: str | None) -> str | None:
    """The address a driver will join, ``auto`` read through ``RAY_ADDRESS``; None where Ray starts a
    cluster (None, ``local``) or finds one itself (``auto`` without ``RAY_ADDRESS``)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "auto", "local") else address


def check_address(address: str | None, *, field: str = "--address") -> None:
    """Something must answer at a cluster address (a TCP connect, ``ADDRESS_TIMEOUT_S``) before Ray tries for 20 s.

    ``auto`` is checked through ``RAY_ADDRESS`` when that is set; otherwise Ray finds the cluster.
    """
    if address == "auto":
        field = "RAY_ADDRESS (used by --address auto)"
    address = _named_address(address)
    if address is None:
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Invalid {field}: {address!r} (expected auto, HOST:PORT such as 10.0.0.5:6379, or ray://HOST:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S) as conn:
            reply = b"" if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true") else _grpc_greeting(conn)
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ValueError(
            f"Invalid {field}: {address!r} (nothing answers at {host}:{port}: {reason}); "
            "check the head node's address and port and that the cluster is up (`ray status` on the head; "
            "`RAY_AUTH_MODE=token ray status` where the cluster was started with token authentication)"
        ) from None
    if reply.startswith((b"HTTP/", b"<")):
        raise ValueError(
            f"Invalid {field}: {address!r} (a web server answers there, not Ray: the dashboard's port?); "
            "give the head's GCS port, 6379 unless `ray start --port` chose another"
        )


def _grpc_greeting(conn: socket.socket) -> bytes:
    """What a server answers to HTTP/2's client preface: a gRPC server (Ray's GCS, its client server)
    sends a SETTINGS frame, an HTTP/1 server (the dashboard) an error page; b"" when nothing came."""
    try:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return conn.recv(16)
    except OSError:
        return b""


# ---------------------------------------------------------------------- joining a cluster: its token
def auth_token_source() -> str | None:
    """Where Ray would read this driver's auth token from (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if custom:
        return custom if Path(custom).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def present_auth_token() -> bool:
    """Joining a cluster: turn on Ray's token mode when a token is at hand and the user chose no mode.

    ``ray.init(address=...)`` presents a token only under ``RAY_AUTH_MODE=token``, while a cluster
    that ``ray start --head`` started where ``~/.ray/auth_token`` exists requires one: without it the
    driver retried for 20 s and failed. A cluster without token auth accepts a driver that presents
    one. Ray reads the mode when it is imported, so this must run before. True if it set the mode.
    """
    if os.environ.get("RAY_AUTH_MODE") is None and auth_token_source() is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def _driver_token() -> str | None:
    """The token Ray would present for this driver: only under ``RAY_AUTH_MODE=token``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    source = auth_token_source()
    return Path(source).expanduser().read_text().strip() if source else None


def cluster_refuses_token(address: str | None) -> bool:
    """Whether the GCS at ``address`` (HOST:PORT) answers UNAUTHENTICATED to the token this driver
    would present (or to none), asked once with ``ADDRESS_TIMEOUT_S``.

    ``ray.init`` retries such a refusal for 20 s before it fails; this question takes milliseconds. It
    calls the GCS's cheapest method (GetClusterId, an empty request) with the bearer token the way
    Ray's own clients send it. Any other outcome (an answer, another error, a TLS cluster, ``auto``
    without ``RAY_ADDRESS``, a ``ray://`` client address) is False: ``ray.init`` then decides.
    """
    address = _named_address(address)
    if address is None or address.startswith("ray://"):
        return False
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return False
    import grpc  # Ray's own dependency; the driver imports it with Ray right after this

    token = _driver_token()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address.split("://", 1)[-1].rstrip("/")) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=ADDRESS_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


# ---------------------------------------------------------------------- resume
def read_resumable(sweep_dir: Any, *, mend: bool = True) -> dict[str, Any]:
    """``sweep.json`` of a sweep ``--resume`` can continue (a ``StoragePath``); ValueError otherwise.

    ``mend``: put back Tune state files a killed driver left cut short (``pf_sweep.tune_state``);
    a dry run leaves the directory as it is.
    """
    from pf_sweep.sweep import read_sweep

    meta = read_sweep(sweep_dir)
    if not (sweep_dir / TUNER_STATE).exists():
        raise ValueError(
            f"No restorable sweep at {sweep_dir} (Tune saved no {TUNER_STATE} there); launch it again without --resume"
        )
    if mend:  # a driver killed while Tune copied its state leaves a file cut short; Tune staged a whole copy
        mend_torn_state(sweep_dir)
    return meta


# ---------------------------------------------------------------------- entry points
def check_trial(config: Any, *, storage_path: str | None, address: str | None, local: bool) -> None:
    """What ``run_trial`` checks before training or starting Ray (the config validated itself)."""
    from pf_sweep.config import TrialConfig

    if not isinstance(config, TrialConfig):
        return  # run_trial's own message
    if storage_path is not None:
        check_storage(storage_path, field="storage_path")
    on_cluster = not local and (address is not None or ray_running())
    if not local:
        check_address(address, field="address")
    if local or not on_cluster:
        gpus = config.gpus_per_worker if config.use_gpu else 0.0
        check_local_resources(config.num_workers, config.cpus_per_worker, gpus, in_process=local)
    check_datasets([config], on_cluster=on_cluster)
    check_pretrained(config.pretrained_path, on_cluster=on_cluster)


def planned_configs(space: Any, settings: Any, base: dict[str, Any]) -> list[Any]:
    """Configs that stand for a sweep: every named run or grid point (few and known), else the base and the first proposals."""
    from pf_sweep.config import TrialConfig

    if getattr(space, "points", None) is not None:
        from pf_sweep.sweep import run_params

        return [TrialConfig.from_dict({**base, **run_params(space, run, settings)}) for run in space.points]
    configs = [TrialConfig.from_dict(base)]
    if hasattr(space, "sample") and hasattr(space, "config_for"):
        count = 10**6 if space.suggest is None else min(3, settings.num_samples)
        configs += [space.config_for(params, {**base}) for params in space.sample(count, seed=settings.seed)]
    return configs


def check_overrides_fixed(space: Any, overrides: dict[str, Any]) -> None:
    """A ``--set`` of a field the space searches would be replaced by each trial's searched value
    without a word, and the sweep would train something else than asked: refused, saying which."""
    searched = space.searched_fields() if hasattr(space, "searched_fields") else set()
    clash = sorted(set(overrides) & searched)
    if clash:
        fields = ", ".join(clash)
        raise ValueError(
            f"Invalid --set {fields}: space {space.name!r} searches {'it' if len(clash) == 1 else 'them'} "
            f"(it searches {', '.join(sorted(searched))}); --set fixes only the fields a space leaves fixed. "
            "To fix a searched field, use or write a space that leaves it fixed (see search_spaces/)"
        )


def check_sweep(
    space: Any,
    settings: Any,
    *,
    storage_path: str,
    address: str | None,
    configs: list[Any] | None = None,
    warn: Warn = logger.warning,
) -> None:
    """What ``sweep.launch`` and ``run_sweep.py`` check before starting Ray (``configs``: already built ones)."""
    from pf_sweep.sweep import trial_base

    settings.validate()
    base = trial_base(space, settings)
    check_overrides_fixed(space, settings.overrides or {})
    on_cluster = address is not None or ray_running()
    if not on_cluster:
        check_local_resources(settings.workers_per_trial, settings.cpus_per_worker, settings.gpus_per_worker)
    check_storage(storage_path, field="--storage (storage_path)")
    check_address(address, field="--address (address)")
    configs = configs if configs is not None else planned_configs(space, settings, base)
    check_datasets(configs, on_cluster=on_cluster, warn=warn)
    for path in sorted({c.pretrained_path for c in configs if c.pretrained_path}):
        check_pretrained(path, on_cluster=on_cluster, warn=warn)
