"""The paper presets (``paper_rn50``, ``paper_rn101``, ``paper_vits32``, ``paper_vits16``): every run
resolves to the release's settings, the pieces they build behave as the release's code does (SGDW,
the linear schedule, weight-decay groups, the ViT head), the global batch splits over any worker
count, and the runs train two steps on ``tfds.testing.mock_data`` with their real models at 32 px.
The CIFAR fine-tuning presets (``paper_cifar10_finetune``, ``paper_cifar100_finetune``) start each
run from its ImageNet source run's final checkpoint in an earlier (here hand-made) sweep.

The expected values below are the release's, restated from its launch scripts and their argparse
defaults (not read from the presets), so a preset that drifts from the release fails here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_sweep_mid_trial

import search_spaces
from pf_sweep.config import TrialConfig
from pf_sweep.sweep import SweepSettings, run_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["paper_rn50", "paper_rn101", "paper_vits32", "paper_vits16"]

IMAGENET = {
    "dataset": "tfds/imagenet2012",
    "train_split": "train",
    "val_split": "validation",
    "img_size": 224,
    "scale": (0.05, 1.0),
    "ratio": (0.75, 4 / 3),
    "hflip": 0.5,
    "interpolation": "bilinear",
    "eval_interpolation": "bicubic",
    "crop_pct": 0.875,
    "seed": 42,
    "drop": 0.0,
    "amp": False,
    "warmup_lr": 0.0,
    "sched": "linear",
}
RESNET = {
    **IMAGENET,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "opt": "sgdw",
    "nesterov": False,
    "momentum": 0.9,
    "lr": 1.6,
    "min_lr": 0.016,
    "epochs": 90,
    "warmup_epochs": 16,
    "weight_decay": 0.001,
    "loss": "ce",
    "smoothing": 0.0,
    "clip_grad": None,
    "head_init_bias": None,
    "model_kwargs": {},
}
VIT = {
    **IMAGENET,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "opt": "adamw",
    "lr": 0.003,
    "min_lr": 3e-5,
    "epochs": 300,
    "warmup_epochs": 32,
    "weight_decay": 0.3,
    "loss": "bce",
    "bce_reduction": "sum_mean",
    "smoothing": 0.0,
    "clip_grad": 1.0,
    "head_init_bias": -10.0,
    "model_kwargs": {"class_token": False, "global_pool": "avg", "weight_init": "jax"},
}
SGD = {"method": "sgd", "sharpness_m": None, "snp_factor": 0.0}


def sam(method, perturbation, rho, policy="constant", min_rho=None, **extra):
    out = {"method": method, "perturbation": perturbation, "rho": rho, "rho_policy": policy, "sharpness_m": 64}
    if min_rho is not None:
        out["min_rho"] = min_rho
    defaults = {"gsam_alpha": 0.0, "backup_normalized": False, "asam_before_norm": False, "asam_after_norm": False}
    return {**out, **defaults, **extra}


TINY_GAMMA = {"obf_C": 1000.0, "obf_gamma": 1e-12}
ONE_GAMMA = {"obf_C": 1000.0, "obf_gamma": 1.0}
RESNET_RUNS = {
    "vanilla": SGD,
    "sam_max": sam("sam", "max", 0.04, "lr_prop", 0.02),
    "sam_obf": sam("sam", "obf", 0.04, **TINY_GAMMA),
    "gsam_max": sam("gsam", "max", 0.04, "lr_prop", 0.02, gsam_alpha=0.01, backup_normalized=True),
    "gsam_obf": sam("gsam", "obf", 0.04, gsam_alpha=0.01, backup_normalized=False, **TINY_GAMMA),
}
EXPECTED = {
    "paper_rn50": (
        {**RESNET, "model": "resnet50"},
        {
            **RESNET_RUNS,
            "labelsmooth": {**SGD, "smoothing": 0.1},
            "shrink_perturb": {**SGD, "snp_factor": 1e-5},
            "sam_rand": sam("randsam", "max", 0.04),
            "asam_max": sam("asam", "max", 0.8, "lr_prop", 0.4, asam_before_norm=True),
            "asam_obf": sam("asam", "obf", 0.8, asam_before_norm=True, **TINY_GAMMA),
        },
    ),
    "paper_rn101": ({**RESNET, "model": "resnet101"}, RESNET_RUNS),
    "paper_vits32": (
        {**VIT, "model": "vit_small_patch32_224"},
        {
            "vanilla": SGD,
            "labelsmooth": {**SGD, "smoothing": 0.1},
            "shrink_perturb": {**SGD, "snp_factor": 1e-5},
            "sam_max": sam("sam", "max", 0.6, "lr_prop", 0.0),
            "sam_obf": sam("sam", "obf", 0.6, **ONE_GAMMA),
            "sam_rand": sam("randsam", "max", 0.6),
            "gsam_max": sam("gsam", "max", 0.6, "lr_prop", 0.0, gsam_alpha=0.4, backup_normalized=False),
            "gsam_obf": sam("gsam", "obf", 0.6, gsam_alpha=0.4, backup_normalized=True, **ONE_GAMMA),
            "asam_max": sam("asam", "max", 6.0, asam_after_norm=True),
            "asam_obf": sam("asam", "obf", 6.0, asam_after_norm=True, **TINY_GAMMA),
        },
    ),
    "paper_vits16": (
        {**VIT, "model": "vit_small_patch16_224"},
        {
            "vanilla": SGD,
            "sam_max": sam("sam", "max", 0.6),
            "sam_obf": sam("sam", "obf", 0.6, **ONE_GAMMA),
            "gsam_max": sam("gsam", "max", 0.6, "lr_prop", 0.0, gsam_alpha=1.0, backup_normalized=False),
            "gsam_obf": sam("gsam", "obf", 0.6, gsam_alpha=0.4, backup_normalized=True, **ONE_GAMMA),
        },
    ),
}
CASES = [(preset, run) for preset, (_, runs) in EXPECTED.items() for run in runs]


def resolved(preset: str, run: str, workers: int = 1, **overrides) -> TrialConfig:
    """The run's config as a sweep with these --set overrides would train it."""
    space = search_spaces.get(preset).with_runs([run])
    settings = SweepSettings(num_samples=1, max_concurrent=1, workers_per_trial=workers, overrides=overrides)
    return run_config(space, run, settings)


# ------------------------------------------------------------------------------ the values


def test_each_preset_has_exactly_the_releases_runs_in_its_order():
    for preset, (_, runs) in EXPECTED.items():
        assert list(search_spaces.get(preset).points) == list(runs), preset


@pytest.mark.parametrize(("preset", "run"), CASES)
def test_every_run_resolves_to_the_releases_settings(preset, run):
    script, runs = EXPECTED[preset]
    cfg = resolved(preset, run)
    expected = {**script, **runs[run], "run_name": run}
    got = {name: getattr(cfg, name) for name in expected}
    for name in ("ratio", "scale"):
        assert got[name] == pytest.approx(expected.pop(name)), name
        got.pop(name)
    assert got == expected
    assert cfg.global_batch_size == 4096


@pytest.mark.parametrize(
    ("preset", "per_worker"), [("paper_rn50", 256), ("paper_rn101", 256), ("paper_vits32", 512), ("paper_vits16", 512)]
)
def test_the_global_batch_of_4096_splits_over_1_8_and_32_workers(preset, per_worker):
    expected = {1: (per_worker, 4096 // per_worker), 8: (per_worker, 4096 // (8 * per_worker)), 32: (128, 1)}
    for workers, (batch, accum) in expected.items():
        cfg = resolved(preset, "sam_obf", workers)
        assert (cfg.batch_size, cfg.grad_accum_steps, cfg.num_workers) == (batch, accum, workers)
        assert cfg.global_batch_size == 4096
    with pytest.raises(ValueError, match="4096 does not split over 3 workers"):
        resolved(preset, "vanilla", 3)


def test_set_overrides_win_over_the_global_batch_and_the_runs_own_fields():
    cfg = resolved("paper_rn50", "sam_obf", batch_size=8, sharpness_m=4, rho=0.1)
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.sharpness_m, cfg.rho) == (8, 1, 4, 0.1)
    with pytest.raises(ValueError, match=r"Invalid sharpness_m: 64 \(must be a positive divisor of the per-worker batch_size 8"):
        resolved("paper_rn50", "sam_obf", batch_size=8)
    with pytest.raises(ValueError, match=r"sharpness_m.*only meaningful with a SAM method"):
        resolved("paper_rn50", "vanilla", sharpness_m=4)


def test_runs_selects_a_subset_and_an_unknown_run_is_refused_naming_the_known_ones():
    space = search_spaces.get("paper_rn50").with_runs(["sam_obf", "sam_max"])
    assert list(space.points) == ["sam_max", "sam_obf"]  # the preset's order
    with pytest.raises(ValueError, match="known runs are vanilla, sam_max"):
        search_spaces.get("paper_rn50").with_runs(["sam_maxx"])
    with pytest.raises(ValueError, match="has no named runs"):
        search_spaces.get("digits_cpu").with_runs(["sam_max"])


def refused(tmp_path: Path, *args: str) -> str:
    """run_sweep.py's error line for ``args``, asserting exit 2 with no Ray imported (the fake ``ray`` fails)."""
    from conftest import fake_ray_path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([fake_ray_path(tmp_path), str(ROOT)])}
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


def test_cli_refuses_an_unknown_run_with_exit_2_before_ray(tmp_path):
    error = refused(tmp_path, "--space", "paper_vits16", "--runs", "asam_max")
    assert "Invalid --runs 'asam_max' for paper_vits16: known runs are vanilla" in error


# ------------------------------------------------------------------------------ what they build


def release_sgdw_(params, grads, bufs, lr, wd, momentum):
    """The release's SGDW, written out: decay, heavy-ball momentum (first buffer = gradient), step."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        p.mul_(1 - lr * wd)
        bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        p.sub_(lr * bufs[i])


def test_the_resnet_optimizer_is_the_releases_sgdw_with_decay_on_weight_matrices_only():
    from pf_sweep.optim.build import build_optimizer

    cfg = resolved("paper_rn50", "vanilla")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    decayed = [p.ndim > 1 for p in model.parameters()]
    optimizer = build_optimizer(model, cfg)
    bufs = [None] * len(reference)
    lr = 0.3
    for group in optimizer.param_groups:
        group["lr"] = lr
    for step in range(4):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        for i, (p, g, wd) in enumerate(zip(reference, grads, decayed, strict=True)):
            one = [bufs[i]]
            release_sgdw_([p], [g], one, lr, cfg.weight_decay if wd else 0.0, cfg.momentum)
            bufs[i] = one[0]
        for p, q in zip(model.parameters(), reference, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7, msg=f"step {step}")


def test_the_linear_schedule_warms_up_from_zero_and_reaches_min_lr_at_the_last_update():
    from pf_sweep.optim.build import build_scheduler

    cfg = resolved("paper_rn50", "vanilla").replace(epochs=10, warmup_epochs=2)
    upe, warmup, total = 7, 14, 70
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, upe)

    def release_lr(t):
        if t < warmup:
            return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / warmup
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - (t - warmup) / (total - warmup))

    for t in range(total + 1):
        scheduler.step_update(t)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(release_lr(t), rel=1e-9, abs=1e-12), t
    assert release_lr(total) == pytest.approx(cfg.min_lr)


def test_lr_prop_rho_follows_the_warmup_as_in_the_release():
    from pf_sweep.optim.build import build_rho_schedule

    rn = build_rho_schedule(resolved("paper_rn50", "sam_max"))
    vit = build_rho_schedule(resolved("paper_vits32", "sam_max"))
    assert rn(0.0) == pytest.approx(0.02 - 0.02 * 0.016 / (1.6 - 0.016))  # just under rho_min, ~0.0198
    assert (rn(1.6), rn(0.016)) == pytest.approx((0.04, 0.02))
    assert vit(0.0) == 0.0 and vit(0.003) == pytest.approx(0.6)


def test_the_vit_has_no_class_token_averages_its_patches_and_starts_with_a_zero_head_at_bias_minus_10():
    from pf_sweep.data.registry import DatasetInfo
    from pf_sweep.models import build_model
    from pf_sweep.optim.build import build_optimizer

    cfg = resolved("paper_vits32", "vanilla").replace(img_size=64)
    info = DatasetInfo(name="x", num_classes=1000, in_chans=3, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, splits=())
    model = build_model(cfg, info)
    assert model.cls_token is None and model.global_pool == "avg"
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) and isinstance(model.norm, torch.nn.Identity)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.all(model.head.bias == -10.0)
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape[1] == 4  # 2 x 2 patches, no class token
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), model.fc_norm(tokens.mean(1)))

    decayed = {id(p) for g in build_optimizer(model, cfg).param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    expected = {n for n, p in model.named_parameters() if p.ndim > 1 and n != "pos_embed"}
    assert names == expected and "head.weight" in names


# ------------------------------------------------------------------------------ two steps each


# Every run of the two presets that hold every method; ResNet-101 and ViT-S/16 repeat their recipes
# on bigger models, so two runs of each are enough to show those models build and train.
TRAINED = [c for c in CASES if c[0] in ("paper_rn50", "paper_vits32")]
TRAINED += [("paper_rn101", "vanilla"), ("paper_rn101", "gsam_obf"), ("paper_vits16", "vanilla"), ("paper_vits16", "gsam_max")]


@pytest.mark.parametrize(("preset", "run"), TRAINED)
def test_the_runs_train_two_steps_on_mocked_imagenet_with_their_real_models(preset, run):
    import tensorflow_datasets as tfds

    from pf_sweep.trial import run_trial

    shrink = {"img_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "train_eval_size": 8}
    if "sharpness_m" in EXPECTED[preset][1][run] and EXPECTED[preset][1][run]["sharpness_m"]:
        shrink["sharpness_m"] = 4  # --set wins over the run's own m = 64
    cfg = resolved(preset, run, **shrink)
    assert (cfg.grad_accum_steps, cfg.model) == (1, EXPECTED[preset][0]["model"])
    # The default policy, as a user's own test would call it: no metadata files written anywhere.
    with tfds.testing.mock_data(num_examples=16):
        result = run_trial(cfg, local=True, storage_path=None)
    assert result.metrics["epoch"] == 0 and result.metrics["step"] == 2
    assert math.isfinite(result.metrics["train/loss"])
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------ on Ray

NAMED_SPACE = """
from search_spaces.base import SearchSpace

SPACE = SearchSpace(
    name="named",
    description="three named runs on digits",
    base={"dataset": "digits", "model": "pf_mlp", "train_split": "train[:256]", "epochs": 1, "batch_size": 32,
          "train_eval_size": 64, "method": "sgd", "lr": 0.05},
    points={
        "plain": {},
        "sam_small": {"method": "sam", "rho": 0.01, "sharpness_m": 16},
        "sam_big": {"method": "sam", "rho": 0.5},
    },
    global_batch=64,
)
"""


@pytest.mark.ray
def test_a_named_run_sweep_trains_the_chosen_runs_once_each_with_set_on_top(tmp_path):
    from analysis import load_sweep

    (tmp_path / "named.py").write_text(NAMED_SPACE)
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--space", str(tmp_path / "named.py"), "--storage", str(tmp_path)]
    cmd += ["--runs", "sam_big,plain", "--set", "rho=0.3", "--max-failures", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = load_sweep(tmp_path / "named").set_index("run_name").sort_index()
    assert list(trials.index) == ["plain", "sam_big"]
    assert set(trials["status"]) == {"TERMINATED"}
    assert trials.loc["sam_big", "method"] == "sam" and trials.loc["plain", "method"] == "sgd"
    assert set(trials["rho"]) == {0.3}  # --set wins over sam_big's own 0.5
    assert set(trials["batch_size"]) == {32} and set(trials["grad_accum_steps"]) == {2}  # 64 = 1 x 32 x 2


@pytest.mark.ray
@pytest.mark.parametrize(
    ("flags", "sweep"),
    [
        (["--runs", "plain,sam_small,sam_big"], "named"),
        (["--runs", "sam_small", "--search", "rho", "--num-samples", "3"], "named_sam_small_search"),
    ],
    ids=["named-runs", "search"],
)
def test_a_killed_named_run_or_search_sweep_resumes_each_trial_once(tmp_path, flags, sweep):
    # SIGKILL the driver's process group once one trial has finished and the next has stored an
    # epoch; --resume must not run a named run (or the search's own first point) a second time.
    from analysis import load_sweep

    (tmp_path / "named.py").write_text(NAMED_SPACE)
    epochs = 3
    args = ["--space", str(tmp_path / "named.py"), "--storage", str(tmp_path), *flags, "--max-concurrent", "1"]
    args += ["--set", f"epochs={epochs}", "--set", "train_split=train[:640]", "--max-failures", "0"]
    cmd, env = [sys.executable, str(ROOT / "run_sweep.py"), *args], {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = tmp_path / sweep / "runs"
    finished, _ = sigkill_sweep_mid_trial(cmd, env=env, runs=runs, last_epoch=epochs - 1, cwd=tmp_path)
    trained = {run.name: (run / f"checkpoint_{epochs - 1:06d}" / "state.pt").stat().st_mtime_ns for run in finished}

    resume = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(tmp_path), "--name", sweep, "--resume"]
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = load_sweep(tmp_path / sweep)
    assert len(trials) == 3 and set(trials["status"]) == {"TERMINATED"} and set(trials["epochs_done"]) == {epochs}
    if sweep == "named":
        assert sorted(trials["run_name"]) == ["plain", "sam_big", "sam_small"]
        by_run = trials.set_index("run_name")
        assert list(by_run.loc[["plain", "sam_small", "sam_big"], "method"]) == ["sgd", "sam", "sam"]
        assert list(by_run.loc[["sam_small", "sam_big"], "rho"]) == [0.01, 0.5]
    else:
        assert set(trials["run_name"]) == {"sam_small"} and list(trials["rho"]).count(0.01) == 1  # its own point, once
    for name, mtime in trained.items():
        assert (runs / name / f"checkpoint_{epochs - 1:06d}" / "state.pt").stat().st_mtime_ns == mtime, f"{name} trained again"


# ------------------------------------------------------------------------------ CIFAR fine-tuning


FINETUNE_SOURCES = {
    "rn50_max2sgd": ("paper_rn50", "sam_max"),
    "rn50_obf2sgd": ("paper_rn50", "sam_obf"),
    "rn50_sgd2max": ("paper_rn50", "vanilla"),
    "rn50_sgd2obf": ("paper_rn50", "vanilla"),
    "vits32_max2sgd": ("paper_vits32", "sam_max"),
    "vits32_obf2sgd": ("paper_vits32", "sam_obf"),
    "vits32_adamw2max": ("paper_vits32", "vanilla"),
    "vits32_adamw2obf": ("paper_vits32", "vanilla"),
}
FINETUNE = {"opt": "momentum", "momentum": 0.9, "weight_decay": 0.0, "clip_grad": 1.0, "epochs": 100, "warmup_epochs": 5}
FINETUNE |= {"warmup_lr": 0.0, "min_lr": 0.0, "sched": "linear", "img_size": 224, "val_split": "test", "seed": 42}
FINETUNE |= {"interpolation": "bilinear", "eval_interpolation": "bicubic", "crop_pct": 0.875, "hflip": 0.5}
RN_FT = {**FINETUNE, "model": "resnet50", "lr": 0.01, "mean": RESNET["mean"], "model_kwargs": {}, "head_init_bias": None}
VIT_FT = {**FINETUNE, "model": "vit_small_patch32_224", "lr": 0.003, "mean": (0.5,) * 3, "model_kwargs": VIT["model_kwargs"]}
VIT_FT |= {"loss": "bce", "bce_reduction": "sum_mean"}


def finetune_expected(classes: int) -> dict[str, dict]:
    obf = {"obf_C": float(classes), "obf_gamma": 1e-12}
    vit = {**VIT_FT, "head_init_bias": -math.log(classes)}
    bce = {"loss": "bce", "bce_reduction": "sum_mean"}
    return {
        "rn50_max2sgd": {**RN_FT, **SGD, "loss": "ce"},
        "rn50_obf2sgd": {**RN_FT, **SGD, "loss": "ce"},
        "rn50_sgd2max": {**RN_FT, **bce, **sam("sam", "max", 0.1)},
        "rn50_sgd2obf": {**RN_FT, **bce, **sam("sam", "obf", 0.1, **obf)},
        "vits32_max2sgd": {**vit, **SGD},
        "vits32_obf2sgd": {**vit, **SGD},
        "vits32_adamw2max": {**vit, **sam("sam", "max", 0.05)},
        "vits32_adamw2obf": {**vit, **sam("sam", "obf", 0.05, **obf)},
    }


@pytest.mark.parametrize("classes", [10, 100])
def test_the_finetuning_presets_resolve_to_the_releases_settings_and_sources(classes):
    preset = f"paper_cifar{classes}_finetune"
    space = search_spaces.get(preset)
    expected = finetune_expected(classes)
    assert list(space.points) == list(expected) and space.sources == FINETUNE_SOURCES
    for run, fields in expected.items():
        cfg = resolved(preset, run)
        assert {name: getattr(cfg, name) for name in fields} == fields, run
        assert (cfg.dataset, cfg.global_batch_size, cfg.run_name) == (f"tfds/cifar{classes}", 512, run)
        per_worker = 128 if run.startswith("rn50") else 512
        assert (cfg.batch_size, cfg.grad_accum_steps) == (per_worker, 512 // per_worker)
        eight = resolved(preset, run, 8)
        assert (eight.batch_size, eight.grad_accum_steps) == (64, 1)


def fake_sweep(root: Path, space: str, runs: dict[str, tuple[torch.nn.Module, bool]]) -> Path:
    """An earlier sweep as pf-sweep leaves it: sweep.json and, per run, its newest checkpoint
    (the last of 2 epochs when the run finished, the first otherwise)."""
    import json

    from pf_sweep.checkpoint import save_checkpoint

    sweep = root / space
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"space": space, "base": {}, "settings": {}}))
    for i, (run, (model, finished)) in enumerate(runs.items()):
        checkpoint = sweep / "runs" / f"train-{i:05d}" / f"checkpoint_{1 if finished else 0:06d}"
        save_checkpoint(checkpoint, {"model": model.state_dict()}, {"run_name": run, "epochs": 2}, [])
    return sweep


# Per CIFAR preset, two runs and the trial directory (in fake_sweep's order) their source sits in:
# plain SGD from SAM runs for CIFAR-10, SAM fine-tuning from the vanilla runs for CIFAR-100.
CHAINED = {
    10: [("rn50_max2sgd", "00000"), ("vits32_obf2sgd", "00000")],
    100: [("rn50_sgd2obf", "00001"), ("vits32_adamw2max", "00001")],
}


@pytest.mark.parametrize("classes", [10, 100])
def test_a_chained_run_starts_from_its_source_with_the_head_the_release_gives_it(tmp_path, classes):
    import tensorflow_datasets as tfds
    import timm

    from pf_sweep.data.registry import DatasetInfo
    from pf_sweep.models import build_model
    from pf_sweep.trial import run_trial

    torch.manual_seed(0)
    resnet = timm.create_model("resnet50", num_classes=1000)
    vit = timm.create_model("vit_small_patch32_224", num_classes=1000, img_size=32, **VIT["model_kwargs"])
    rn_sweep = fake_sweep(tmp_path, "paper_rn50", {"sam_max": (resnet, True), "vanilla": (resnet, True)})
    vit_sweep = fake_sweep(tmp_path, "paper_vits32", {"sam_obf": (vit, True), "vanilla": (vit, True)})
    runs = CHAINED[classes]
    space = search_spaces.get(f"paper_cifar{classes}_finetune").with_runs([run for run, _ in runs])
    chained = space.from_sweeps([str(rn_sweep), str(vit_sweep)])
    for (run, trial), sweep in zip(runs, (rn_sweep, vit_sweep), strict=True):
        assert chained.points[run]["pretrained_path"] == str((sweep / f"runs/train-{trial}/checkpoint_000001").resolve())

    info = DatasetInfo(name="c", num_classes=classes, in_chans=3, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, splits=())
    shrink = {"img_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "train_eval_size": 8}
    for (run, _), source in zip(runs, (resnet, vit), strict=True):
        overrides = {**shrink, "sharpness_m": 4} if "2sgd" not in run else shrink
        settings = SweepSettings(num_samples=1, max_concurrent=1, overrides=overrides)
        cfg = run_config(chained, run, settings)
        model = build_model(cfg, info)
        head = model.get_classifier()
        body = {k: v for k, v in model.state_dict().items() if not k.startswith(("fc.", "head."))}
        source_state = source.state_dict()
        assert all(torch.equal(v, source_state[k]) for k, v in body.items()), run
        assert head.weight.shape == (classes, source.num_features)
        if run.startswith("rn50"):  # PyTorch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert 0 < head.weight.abs().max() <= 1 / math.sqrt(2048)
        else:  # zero weights, bias -ln(classes)
            assert torch.count_nonzero(head.weight) == 0
            torch.testing.assert_close(head.bias, torch.full((classes,), -math.log(classes)))
        with tfds.testing.mock_data(num_examples=16):
            result = run_trial(cfg, local=True, storage_path=None)
        assert result.metrics["step"] == 2 and math.isfinite(result.metrics["train/loss"])


def test_a_missing_or_unfinished_source_run_is_refused_by_name(tmp_path):
    model = torch.nn.Linear(2, 2)
    rn_sweep = fake_sweep(tmp_path, "paper_rn50", {"vanilla": (model, False)})
    space = search_spaces.get("paper_cifar100_finetune")
    with pytest.raises(ValueError, match=r"sweep .*paper_rn50 has no run 'sam_max' \(it has: vanilla\)"):
        space.with_runs(["rn50_max2sgd"]).from_sweeps([str(rn_sweep)])
    with pytest.raises(ValueError, match=r"run 'vanilla' of sweep .* has not finished"):
        space.with_runs(["rn50_sgd2obf"]).from_sweeps([str(rn_sweep)])
    with pytest.raises(ValueError, match=r"no sweep of space paper_vits32 was given.*add --from-sweep <storage>/paper_vits32"):
        space.with_runs(["vits32_max2sgd"]).from_sweeps([str(rn_sweep)])
    with pytest.raises(ValueError, match="not a sweep directory"):
        space.from_sweeps([str(tmp_path)])


def test_cli_refuses_a_chained_preset_without_its_sweeps_with_exit_2_before_ray(tmp_path):
    args = ["--space", "paper_cifar10_finetune", "--runs", "rn50_max2sgd"]
    assert "name their sweeps with --from-sweep (of space paper_rn50;" in refused(tmp_path, *args)
    assert "not a sweep directory" in refused(tmp_path, *args, "--from-sweep", str(tmp_path))


# ------------------------------------------------------------------------------ --search around a run


def test_search_ranges_are_centred_on_the_run_and_its_own_point_comes_first():
    from search_spaces.base import search_around

    space = search_around(search_spaces.get("paper_rn50").with_runs(["gsam_max"]), ["rho", "sharpness_m", "gsam_alpha"])
    assert (space.points, space.suggest is not None, space.num_samples) == (None, True, 16)
    samples = space.sample(40, seed=3)
    assert samples[0] == {"rho": 0.04, "sharpness_m": 64, "gsam_alpha": 0.01}
    for params in samples[1:]:
        assert 0.01 <= params["rho"] <= 0.16 and 0.0025 <= params["gsam_alpha"] <= 0.04
        assert params["sharpness_m"] in (16, 32, 64, 128, 256)  # divisors of the per-worker 256, m/4 to 4m
        assert params["min_rho"] == pytest.approx(params["rho"] / 2)  # lr_prop keeps min_rho / rho
        cfg = space.config_for(params)
        assert (cfg.method, cfg.run_name, cfg.global_batch_size, cfg.backup_normalized) == ("gsam", "gsam_max", 4096, True)
    assert len({p["sharpness_m"] for p in samples}) > 2 and len({p["rho"] for p in samples}) == len(samples)

    vit = search_around(search_spaces.get("paper_vits32").with_runs(["asam_obf"]), ["obf_gamma"], workers=8)
    gammas = [p["obf_gamma"] for p in vit.sample(20, seed=0)]
    assert gammas[0] == 1e-12 and all(1e-12 <= g <= 1.0 for g in gammas) and max(gammas) > 1e-3
    assert (vit.base["batch_size"], vit.base["grad_accum_steps"]) == (512, 1)


@pytest.mark.parametrize(
    ("runs", "fields", "message"),
    [
        (None, ["rho"], "searches around one named run; pick it with --runs"),
        (["vanilla"], ["rho"], "run 'vanilla' does not use it"),
        (["sam_max"], ["obf_gamma"], "run 'sam_max' does not use it"),
        (["sam_max"], ["momentum"], "searchable fields are rho, lr, weight_decay"),
    ],
)
def test_search_refuses_what_has_no_centre(runs, fields, message):
    from search_spaces.base import search_around

    space = search_spaces.get("paper_rn50")
    with pytest.raises(ValueError, match=message):
        search_around(space.with_runs(runs) if runs else space, fields)


@pytest.mark.ray
def test_a_search_around_a_named_run_runs_on_optuna_from_the_runs_point(tmp_path):
    from analysis import load_sweep

    (tmp_path / "named.py").write_text(NAMED_SPACE)
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--space", str(tmp_path / "named.py"), "--storage", str(tmp_path)]
    cmd += ["--runs", "sam_small", "--search", "rho,sharpness_m", "--num-samples", "2", "--max-failures", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = load_sweep(tmp_path / "named_sam_small_search")
    assert len(trials) == 2 and set(trials["status"]) == {"TERMINATED"} and set(trials["run_name"]) == {"sam_small"}
    assert 0.01 in set(trials["rho"]) and 16 in set(trials["sharpness_m"])  # the run's own point first
    assert all(0.0025 <= r <= 0.04 for r in trials["rho"]) and set(trials["sharpness_m"]) <= {4, 8, 16, 32}
