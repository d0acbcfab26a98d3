"""docs/cluster.md and its two cluster files stay true to the code they describe.

- docs/cluster/ray-cluster.yaml validates against the installed Ray's own cluster-launcher schema
  (``ray/autoscaler/ray-schema.json``, the schema ``ray up`` checks before touching a cloud);
- docs/cluster/rayjob.yaml has the KubeRay v1 RayJob shape the docs promise (entrypoint, GPU worker
  group, rayVersion, the shared claim) and asks for no more GPUs than its worker group can hold;
- every command in the docs' shell blocks and the YAML files parses: ``run_sweep.py`` arguments
  through ``run_sweep.build_parser()`` (``--set`` fields through ``parse_field_value``), ``ray ...``
  through the installed Ray CLI, ``python -m pf_sweep.data`` subcommands against the known set;
- shared paths used by ``--storage`` and ``data_dir`` are mounted on every node of both clusters.

No Ray cluster, no network, no torch: a few seconds.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cluster.md"
CLUSTER_YAML = ROOT / "docs" / "cluster" / "ray-cluster.yaml"
RAYJOB_YAML = ROOT / "docs" / "cluster" / "rayjob.yaml"
RAY_VERSION = importlib.metadata.version("ray")
DATA_SUBCOMMANDS = {"prepare", "convert", "info"}
DATA_FLAGS = {"--data-dir", "--manual-dir", "--module"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
OPERATORS = set(";&|()<>")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- reading the docs
def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` fenced block."""
    return [
        (m["lang"].strip().lower(), m["body"]) for m in re.finditer(r"^```(?P<lang>[^\n]*)\n(?P<body>.*?)^```", text, re.M | re.S)
    ]


def prose(text: str) -> str:
    return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)


def inline_code(text: str) -> list[str]:
    return [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", prose(text))]


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations joined; blank lines and comments dropped."""
    joined = re.sub(r"\\\n", " ", script)
    return [line for line in (raw.strip() for raw in joined.splitlines()) if line and not line.startswith("#")]


def simple_commands(line: str) -> list[list[str]]:
    """Split a shell line into simple commands (on ; && || | and redirections), env assignments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    result = []
    for words in commands:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            result.append(words)
    return result


def yaml_commands(node: Any, key: str = "") -> list[str]:
    """Shell strings of a cluster-launcher file (``*_commands``) or a RayJob (``entrypoint``, ``command``)."""
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += yaml_commands(v, str(k))
    elif isinstance(node, list):
        if key == "command" and all(isinstance(x, str) for x in node):
            found.append(shlex.join(node))
        else:
            for item in node:
                found += yaml_commands(item, key)
    elif isinstance(node, str) and (key.endswith("commands") or key == "entrypoint"):
        found.append(node)
    return found


# ----------------------------------------------------------------------------- checking commands
class Checker:
    """Parses every command it is shown; remembers the run_sweep argument lists it accepted."""

    def __init__(self) -> None:
        import run_sweep

        self.parser = run_sweep.build_parser()
        self.run_sweep_flags = {opt for action in self.parser._actions for opt in action.option_strings}
        self.run_sweep_calls: list[tuple[str, Any]] = []
        self.errors: list[str] = []

    def line(self, line: str, where: str) -> None:
        for words in simple_commands(line):
            self.command(words, where)

    def command(self, words: list[str], where: str) -> None:
        text = shlex.join(words)
        if words[0] == "ray":  # its entrypoint / command string is checked from the parsed CLI
            self.ray(words[1:], where, text)
            return
        scripts = [i for i, w in enumerate(words) if w.endswith("run_sweep.py")]
        if scripts:
            self.run_sweep(words[scripts[0] + 1 :], f"{where}: {text}")
        if "pf_sweep.data" in words:
            rest = words[words.index("pf_sweep.data") + 1 :]
            if not rest or rest[0] not in DATA_SUBCOMMANDS:
                self.errors.append(f"{where}: {text}: pf_sweep.data subcommand must be one of {sorted(DATA_SUBCOMMANDS)}")
            if rest and not (set(w.split("=")[0] for w in rest if w.startswith("--")) <= DATA_FLAGS):
                self.errors.append(f"{where}: {text}: pf_sweep.data flags must be among {sorted(DATA_FLAGS)}")

    def run_sweep(self, argv: list[str], where: str) -> None:
        from pf_sweep.config import parse_field_value

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = self.parser.parse_args(argv)
        except SystemExit:
            self.errors.append(f"{where}: {stderr.getvalue().strip().splitlines()[-1]}")
            return
        for item in args.overrides:
            field, _, value = item.partition("=")
            try:
                parse_field_value(field, value)
            except ValueError as err:
                self.errors.append(f"{where}: --set {item}: {err}")
        self.check_space(args.space, where)
        self.run_sweep_calls.append((where, args))

    def check_space(self, space: str, where: str) -> None:
        if not space.endswith(".py") and not (ROOT / "search_spaces" / f"{space}.py").is_file():
            self.errors.append(f"{where}: --space {space}: no search_spaces/{space}.py and not a .py file")

    def ray(self, argv: list[str], where: str, text: str) -> None:
        import click

        cmd, rest = self.ray_context(argv)
        if isinstance(cmd, click.Group):
            self.errors.append(f"{where}: {text}: no such ray subcommand")
            return
        try:
            ctx = cmd.make_context("ray", list(rest))
        except click.ClickException as err:
            self.errors.append(f"{where}: {text}: the ray CLI says: {err.format_message()}")
            return
        if ctx.params.get("entrypoint"):  # ray job submit -- ENTRYPOINT
            self.command(list(ctx.params["entrypoint"]), where)
        if isinstance(ctx.params.get("cmd"), str):  # ray exec CLUSTER "CMD"
            self.line(ctx.params["cmd"], where)

    @staticmethod
    def ray_context(argv: list[str]):
        import click
        from ray.scripts.scripts import cli

        cmd: click.Command = cli
        while isinstance(cmd, click.Group) and argv and argv[0] in cmd.commands:
            cmd, argv = cmd.commands[argv[0]], argv[1:]
        return cmd, argv

    def ray_options(self, path: list[str]) -> set[str]:
        cmd, _ = self.ray_context(path)
        return {opt for param in cmd.params for opt in param.opts if opt.startswith("--")}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return yaml.safe_load(RAYJOB_YAML.read_text())


@pytest.fixture(scope="module")
def checked(doc, cluster, rayjob) -> Checker:
    """Every command of the docs' shell blocks, YAML blocks and both files, parsed once."""
    checker = Checker()
    for lang, body in fenced_blocks(doc):
        if lang in SHELL_LANGS:
            for line in logical_lines(body):
                checker.line(line, f"{DOC.name} ({lang} block)")
        elif lang == "yaml":
            for document in yaml.safe_load_all(body):
                for line in yaml_commands(document):
                    checker.line(line, f"{DOC.name} (yaml block)")
    for name, data in ((CLUSTER_YAML.name, cluster), (RAYJOB_YAML.name, rayjob)):
        for line in yaml_commands(data):
            checker.line(" ".join(line.split()), name)
    return checker


# ----------------------------------------------------------------------------- the launcher file
def test_cluster_yaml_matches_rays_own_schema(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray ships no autoscaler/ray-schema.json")
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_cluster_yaml_has_a_cpu_head_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type with GPUs"
    assert all(t.get("max_workers", 0) >= 1 for t in gpu_types.values())
    assert cluster["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def test_cluster_yaml_installs_pf_sweep_from_a_file_mount(cluster):
    mounts = cluster["file_mounts"]
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert any(remote in c for c in installs for remote in mounts), "setup_commands must pip install a file_mounts path"
    assert all(Path(local).expanduser().resolve() != ROOT for local in mounts.values()), (
        "mounting the checkout itself makes ray up hash .venv and results/"
    )


def test_cluster_yaml_token_auth_and_dashboard(cluster):
    options = " ".join(cluster["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)[1]
    assert any(token_path.startswith(remote.rstrip("/") + "/") for remote in cluster["file_mounts"])
    head_start = " ".join(cluster["head_start_ray_commands"])
    # Services bind to loopback unless the user opts in (docs/cluster.md, Security).
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text() + RAYJOB_YAML.read_text()


# ----------------------------------------------------------------------------- the RayJob
def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def claim_mounts(template: dict[str, Any]) -> dict[str, str]:
    """mountPath -> claimName of the PVC volumes mounted into the Ray container."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {m["mountPath"]: claims[m["name"]] for m in ray_container(template).get("volumeMounts", []) if m["name"] in claims}


def test_rayjob_structure(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert shlex.split(spec["entrypoint"])[0] == "python"
    assert any(w.endswith("run_sweep.py") for w in shlex.split(spec["entrypoint"]))
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]
    assert "nvidia.com/gpu" not in ray_container(head["template"]).get("resources", {}).get("limits", {})
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in ray_container(g["template"])["resources"]["limits"]
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= group.keys()
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    for group in [head, *cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), "rayStartParams values are strings"
        image = ray_container(group["template"])["image"]
        if image.startswith("rayproject/ray:"):
            assert image.split(":")[1].startswith(f"{RAY_VERSION}-")
    yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))


def test_rayjob_mounts_one_shared_claim_everywhere(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    mounts = [claim_mounts(t) for t in templates]
    assert mounts[0], "the head pod mounts no PersistentVolumeClaim"
    assert all(m == mounts[0] for m in mounts), f"pods mount different claims: {mounts}"


def test_rayjob_head_ray_start_params_are_ray_start_options(rayjob, checked):
    options = checked.ray_options(["start"])
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for key in group.get("rayStartParams", {}):
            assert f"--{key}" in options, f"rayStartParams {key!r} is not a `ray start` option"


def cpu_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayjob_sweep_fits_its_gpu_workers(rayjob, checked):
    (args,) = [a for where, a in checked.run_sweep_calls if where.startswith(RAYJOB_YAML.name)]
    gpu_slots, cpus = 0, []
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = ray_container(group["template"])["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_slots += group["maxReplicas"] * int(limits["nvidia.com/gpu"])
            cpus.append(cpu_quantity(limits["cpu"]))
    assert args.max_concurrent * args.workers_per_trial * args.gpus_per_worker <= gpu_slots
    assert args.cpus_per_worker <= max(cpus)


# ----------------------------------------------------------------------------- commands everywhere
def test_every_command_parses(checked):
    assert not checked.errors, "\n".join(checked.errors)


def test_docs_show_the_cluster_flags(checked):
    """The commands cover what the page explains, on a cluster (``--address``) and with ``--resume``."""
    wheres = {where.split(":")[0] for where, _ in checked.run_sweep_calls}
    assert any(w.startswith(DOC.name) for w in wheres) and RAYJOB_YAML.name in wheres
    cluster_calls = [args for _, args in checked.run_sweep_calls if args.address]
    assert len(cluster_calls) >= 4
    used = {flag for _, args in checked.run_sweep_calls for flag, value in vars(args).items() if value not in (None, False, [])}
    assert {"workers_per_trial", "gpus_per_worker", "cpus_per_worker", "max_concurrent", "resume", "storage"} <= used
    assert any(args.address == "auto" for args in cluster_calls)


def test_cluster_sweeps_use_shared_storage(checked, cluster, rayjob):
    """``--storage`` and ``data_dir`` of cluster commands are URIs or paths every node mounts."""
    docker_mounts = {opt.split()[1].split(":")[1] for opt in cluster["docker"]["run_options"] if opt.startswith("-v ")}
    rayjob_mounts = set(claim_mounts(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]))
    shared = docker_mounts & rayjob_mounts
    assert shared, "the launcher and the RayJob share no mount point"

    def is_shared(path: str) -> bool:
        return "://" in path or any(path == m or path.startswith(m.rstrip("/") + "/") for m in shared)

    for where, args in checked.run_sweep_calls:
        if not args.address:
            continue
        assert is_shared(args.storage), f"{where}: --storage {args.storage} is not shared storage"
        for item in args.overrides:
            if item.startswith("data_dir="):
                assert is_shared(item.split("=", 1)[1]), f"{where}: {item} is not shared storage"


def test_data_cli_mentions_use_known_subcommands(doc):
    texts = {DOC.name: doc, CLUSTER_YAML.name: CLUSTER_YAML.read_text(), RAYJOB_YAML.name: RAYJOB_YAML.read_text()}
    seen = 0
    for name, text in texts.items():
        for match in re.finditer(r"pf_sweep\.data[\"',\s]+([A-Za-z_][\w-]*)", text):
            seen += 1
            assert match[1] in DATA_SUBCOMMANDS, f"{name}: python -m pf_sweep.data {match[1]}"
    assert seen >= 2


def test_flags_named_in_prose_exist(doc, checked):
    """Inline code in the text: run_sweep flags and ``--set`` fields exist, ``ray ...`` options exist."""
    from pf_sweep.config import FIELD_NAMES

    job_submit = checked.ray_options(["job", "submit"])
    errors = []
    for span in inline_code(doc):
        words = span.split()
        if words[0] == "ray":
            path = [w for w in words[1:3] if not w.startswith("-")]
            allowed = checked.ray_options(path)
        elif "pf_sweep.data" in words:
            allowed = DATA_FLAGS
        elif words[0] in ("python", "run_sweep.py") or words[0].startswith("--"):
            allowed = checked.run_sweep_flags | DATA_FLAGS | job_submit
        else:
            continue
        for i, word in enumerate(words):
            flag = word.split("=")[0]
            if flag.startswith("--") and flag not in allowed:
                errors.append(f"`{span}`: {flag}")
            if flag == "--set" and i + 1 < len(words) and words[i + 1].split("=")[0] not in FIELD_NAMES:
                errors.append(f"`{span}`: --set {words[i + 1]} is no TrialConfig field")
    assert not errors, "\n".join(errors)


def test_images_match_the_installed_ray(doc):
    texts = doc + CLUSTER_YAML.read_text() + RAYJOB_YAML.read_text()
    tags = set(re.findall(r"rayproject/ray:([\w.\-]+)", texts))
    assert tags, "no rayproject/ray image named"
    assert all(tag.split("-")[0] == RAY_VERSION for tag in tags), tags
