"""What the paper's presets share: the ImageNet recipes of the BorealisAI perturbed-forgetting release.

Each value is the release's (its launch scripts, their argparse defaults and its training code), in
pf-sweep's vocabulary. Where timm builds the same thing differently we pick the release's behaviour
and say how:

- The release's ``sgdw`` is decoupled SGD (``p *= 1 - lr * wd``) with heavy-ball momentum and no
  Nesterov: timm's ``sgdw`` with ``nesterov=False`` (timm's default for ``sgdw`` is Nesterov).
- Its ``linear`` schedule warms up from 0 to ``lr`` and then decays linearly to ``min_lr`` at the
  last update, stepped per update: pf-sweep's ``sched="linear"``.
- Weight decay skips 1-D tensors (norms, biases) and the model's ``no_weight_decay()`` set (a ViT's
  ``pos_embed``): timm's ``filter_bias_and_bn``, which pf-sweep always uses.
- ViTs have no class token and average-pool their patch tokens (``model_kwargs``), with JAX-style
  initialisation (zero head weights, then the head bias set to -10). One difference remains: timm
  draws ``pos_embed`` from a truncated normal with std 0.02, the release from N(0, 1/sqrt(384)).
- Training interpolates bilinearly and evaluates bicubically (Resize 256, center crop 224).
- The global batch is 4096 whatever the cluster: ``global_batch`` makes the sweep choose the
  per-worker batch (at most 256 for ResNets, 512 for ViTs) and the accumulation steps.

Every run is trained once with seed 42, as in the release.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from search_spaces.base import SearchSpace

GLOBAL_BATCH = 4096
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

IMAGENET_DATA: dict[str, Any] = {
    "dataset": "tfds/imagenet2012",
    "train_split": "train",
    "val_split": "validation",
    "img_size": 224,
    "scale": (0.05, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "interpolation": "bilinear",
    "eval_interpolation": "bicubic",
    "crop_pct": 0.875,
}

RESNET: dict[str, Any] = {
    **IMAGENET_DATA,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "opt": "sgdw",
    "nesterov": False,
    "momentum": 0.9,
    "lr": 1.6,
    "warmup_lr": 0.0,
    "min_lr": 0.016,
    "sched": "linear",
    "epochs": 90,
    "warmup_epochs": 16,
    "weight_decay": 1e-3,
    "batch_size": 256,  # the most one worker takes; the sweep resolves it against GLOBAL_BATCH
    "loss": "ce",
    "method": "sgd",
    "seed": 42,
}

VIT: dict[str, Any] = {
    **IMAGENET_DATA,
    "mean": INCEPTION_MEAN,
    "std": INCEPTION_STD,
    "model_kwargs": {"class_token": False, "global_pool": "avg", "weight_init": "jax"},
    "head_init_bias": -10.0,
    "opt": "adamw",
    "lr": 0.003,
    "warmup_lr": 0.0,
    "min_lr": 3e-5,
    "sched": "linear",
    "epochs": 300,
    "warmup_epochs": 32,
    "weight_decay": 0.3,
    "clip_grad": 1.0,
    "batch_size": 512,
    "loss": "bce",
    "bce_reduction": "sum_mean",
    "method": "sgd",
    "seed": 42,
}

M = 64  # the release's --sharpness-m: every SAM-family run perturbs sub-batches of 64


def sam(method: str, perturbation: str, rho: float, **fields: Any) -> dict[str, Any]:
    """A SAM-family run's fields: method, perturbation, rho (constant unless ``rho_policy`` says) and m."""
    return {"method": method, "perturbation": perturbation, "rho": rho, "sharpness_m": M, **fields}


def lr_prop(rho: float, min_rho: float) -> dict[str, Any]:
    """rho following the lr from ``min_rho`` (at min_lr) to ``rho`` (at the peak lr), warmup included."""
    return {"rho": rho, "min_rho": min_rho, "rho_policy": "lr_prop"}


# OBF at the release's gamma = 1e-12: the sigmoid-weighted term vanishes and C has no effect.
OBF_TINY_GAMMA = {"obf_C": 1000.0, "obf_gamma": 1e-12}


def resnet_runs(rho: float = 0.04, min_rho: float = 0.02) -> dict[str, dict[str, Any]]:
    """The runs ResNet-50 and ResNet-101 share (vanilla, SAM and GSAM, each max and OBF)."""
    return {
        "vanilla": {},
        "sam_max": sam("sam", "max", **lr_prop(rho, min_rho)),
        "sam_obf": sam("sam", "obf", rho, **OBF_TINY_GAMMA),
        "gsam_max": sam("gsam", "max", **lr_prop(rho, min_rho), gsam_alpha=0.01, backup_normalized=True),
        "gsam_obf": sam("gsam", "obf", rho, gsam_alpha=0.01, **OBF_TINY_GAMMA),
    }


def preset(name: str, doc: str, base: dict[str, Any], runs: dict[str, dict[str, Any]]) -> SearchSpace:
    """A paper preset: its named runs, one at a time, at the global batch, one GPU per worker by default."""
    return SearchSpace(
        name=name,
        description=doc.strip().splitlines()[0],
        base=base,
        points=runs,
        global_batch=GLOBAL_BATCH,
        num_samples=len(runs),
        max_concurrent=1,
        gpus_per_worker=1.0,
    )


def cifar_finetune(dataset: str, num_classes: int) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, str]]]:
    """The release's CIFAR fine-tuning runs and the ImageNet runs they start from.

    Two protocols: plain SGD from the SAM-max vs the SAM-OBF ImageNet checkpoint (``*_max2sgd`` vs
    ``*_obf2sgd``), and SAM-max vs SAM-OBF fine-tuning from the vanilla checkpoint. 100 epochs (5 of
    warmup) at a global batch of 512, the CIFAR images upsampled to 224, torch SGD with momentum 0.9
    and no weight decay, gradients clipped at 1. The new head is timm's default for a ResNet (PyTorch's
    Linear init) and, for a ViT, zero weights with bias -ln(classes), as the release's loader leaves it.
    """
    data = {**IMAGENET_DATA, "dataset": dataset, "val_split": "test"}
    common = {**data, "opt": "momentum", "momentum": 0.9, "weight_decay": 0.0, "clip_grad": 1.0, "epochs": 100}
    common |= {"warmup_epochs": 5, "warmup_lr": 0.0, "min_lr": 0.0, "sched": "linear"}
    resnet = {**common, "model": "resnet50", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "lr": 0.01, "batch_size": 128}
    vit = {
        **common,
        "model": "vit_small_patch32_224",
        "model_kwargs": VIT["model_kwargs"],
        "head_init_bias": -math.log(num_classes),
        "mean": INCEPTION_MEAN,
        "std": INCEPTION_STD,
        "lr": 0.003,
        "batch_size": 512,
        "loss": "bce",
        "bce_reduction": "sum_mean",
    }
    bce = {"loss": "bce", "bce_reduction": "sum_mean"}
    obf = {"obf_C": float(num_classes), "obf_gamma": 1e-12}
    runs = {
        "rn50_max2sgd": {**resnet, "loss": "ce"},
        "rn50_obf2sgd": {**resnet, "loss": "ce"},
        "rn50_sgd2max": {**resnet, **bce, **sam("sam", "max", 0.1)},
        "rn50_sgd2obf": {**resnet, **bce, **sam("sam", "obf", 0.1, **obf)},
        "vits32_max2sgd": vit,
        "vits32_obf2sgd": vit,
        "vits32_adamw2max": {**vit, **sam("sam", "max", 0.05)},
        "vits32_adamw2obf": {**vit, **sam("sam", "obf", 0.05, **obf)},
    }
    sources = {
        "rn50_max2sgd": ("paper_rn50", "sam_max"),
        "rn50_obf2sgd": ("paper_rn50", "sam_obf"),
        "rn50_sgd2max": ("paper_rn50", "vanilla"),
        "rn50_sgd2obf": ("paper_rn50", "vanilla"),
        "vits32_max2sgd": ("paper_vits32", "sam_max"),
        "vits32_obf2sgd": ("paper_vits32", "sam_obf"),
        "vits32_adamw2max": ("paper_vits32", "vanilla"),
        "vits32_adamw2obf": ("paper_vits32", "vanilla"),
    }
    return runs, sources


def finetune_preset(name: str, doc: str, dataset: str, num_classes: int) -> SearchSpace:
    """A CIFAR fine-tuning preset: global batch 512, each run chained to an ImageNet preset's run."""
    runs, sources = cifar_finetune(dataset, num_classes)
    base = {"dataset": dataset, "val_split": "test", "method": "sgd", "seed": 42}
    space = preset(name, doc, base, runs)
    return dataclasses.replace(space, global_batch=512, sources=sources)
