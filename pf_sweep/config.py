"""``TrialConfig``: every knob of one trial, validated when it is built.

Configuration is data: a frozen dataclass whose plain-dict form (``to_dict``) is what Ray ships to
workers, what search spaces produce, what checkpoints store as ``config.json``, and what the
analysis reads back. Field names are the project's vocabulary: the same name in the CLI
(``--set sharpness_m=32``), the search spaces, the metrics and the tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("sgd", "sam", "gsam", "asam", "randsam")
PERTURBATIONS = ("max", "obf")
LOSSES = ("ce", "bce")
OPTIMIZERS = ("sgd", "sgdw", "momentum", "adam", "adamw")
SCHEDULES = ("cosine", "linear", "constant", "step")
RHO_POLICIES = ("constant", "lr_prop")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
BCE_REDUCTIONS = ("mean", "sum", "sum_mean", "mean_mean", "sum_sum", "mean_sum")


@dataclass(frozen=True)
class TrialConfig:
    """One trial. ``None`` on a data/augmentation field means "the dataset's default"."""

    # ---- data
    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str | None = None  # None: the dataset's own ("validation", else "test")
    eval_sets: tuple[tuple[str, str], ...] = ()
    eval_suite: str | None = None  # pf_sweep.evaluate's suite (imagenet, cifar10, cifar100) scored at the end
    train_eval_size: int = 512
    img_size: int | None = None
    augment: bool = True
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float | None = None
    interpolation: str = "bilinear"
    eval_interpolation: str | None = None  # None: the training interpolation ("random" evaluates bilinear)
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    loader_workers: int = 0
    # ---- model
    model: str = "pf_cnn_small"
    # Passed to timm.create_model: {"class_token": false, "global_pool": "avg"} for the paper's ViTs.
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    drop: float = 0.0
    head_init_bias: float | None = None
    pretrained_path: str | None = None
    # ---- optimization
    opt: str = "momentum"
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    momentum: float = 0.9
    nesterov: bool | None = None  # None: timm's default for opt (Nesterov for sgd and sgdw, not for momentum)
    weight_decay: float = 5e-4
    clip_grad: float | None = None
    epochs: int = 10
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    sched: str = "cosine"
    batch_size: int = 64
    grad_accum_steps: int = 1
    smoothing: float = 0.0
    loss: str = "ce"
    bce_reduction: str = "sum_mean"
    amp: bool = False
    seed: int = 0
    # ---- SAM
    method: str = "sam"
    perturbation: str = "max"
    rho: float = 0.05
    min_rho: float = 0.0
    rho_policy: str = "constant"
    sharpness_m: int | None = None
    gsam_alpha: float = 0.0
    backup_normalized: bool = False
    asam_before_norm: bool = False
    asam_after_norm: bool = False
    obf_C: float = 1000.0
    obf_gamma: float = 1.0
    obf_sigmoid: bool = True
    snp_factor: float = 0.0
    # ---- runtime
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction packs several one-worker trials on a GPU
    checkpoint_every: int = 1
    log_every: int = 0
    max_failures: int = 0
    # Toneva et al. example forgetting: per training example and epoch, was the clean (and the perturbed)
    # pass correct; saved as examples.npz beside each checkpoint, read by analysis.forgetting.load_record.
    record_examples: bool = False
    # The named run of a preset this trial is (``rn50`` ``sam_max``), None for searched trials.
    run_name: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), _HINTS[f.name]))
        _validate(self)

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        """Build from a dict, rejecting unknown keys with a suggestion."""
        unknown = sorted(set(d) - set(FIELD_NAMES))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"Unknown TrialConfig field(s): {', '.join(hints)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrialConfig:
        return self.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ derived values
    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer update over all workers."""
        return self.batch_size * self.grad_accum_steps * self.num_workers

    @property
    def resolved_lr(self) -> float:
        """``lr`` if set, else ``lr_base * global_batch_size / lr_base_size`` (linear scaling)."""
        return self.lr if self.lr is not None else self.lr_base * self.global_batch_size / self.lr_base_size

    @property
    def uses_sam(self) -> bool:
        return self.method != "sgd"


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrialConfig))
_HINTS = typing.get_type_hints(TrialConfig)


def parse_field_value(name: str, text: str) -> Any:
    """Parse a command-line ``field=value`` string into the field's type (JSON first, then raw).

    ``--set sharpness_m=32``, ``--set scale=[0.5,1]``, ``--set eval_sets=[["digits","validation"]]``,
    ``--set pretrained_path=none``.
    """
    if name not in FIELD_NAMES:
        close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown TrialConfig field {name!r}{hint}")
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    hint = _HINTS[name]
    if hint is str or (typing.get_origin(hint) in (types.UnionType, typing.Union) and str in typing.get_args(hint)):
        return text  # a string field takes the text as written ("123", "true" included)
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return _coerce(name, value, _HINTS[name])


# ---------------------------------------------------------------------- type coercion
def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation and normalise it (lists -> tuples, int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"Invalid {name}: {value!r} (expected a list/tuple)")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(f"Invalid {name}: {value!r} (expected {len(args)} values)")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"Invalid {name}: {value!r} (expected a dict)")
        return dict(value)
    if hint in (int, float):
        finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not finite or (hint is int and int(value) != value):
            raise ValueError(f"Invalid {name}: {value!r} (expected {_EXPECTED[hint]})")
        return hint(value)
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ValueError(f"Invalid {name}: {value!r} (expected {_EXPECTED[hint]})")
        return value
    raise TypeError(f"unsupported annotation {_type_name(hint)} for {name}")  # a bug in this file


# ---------------------------------------------------------------------- validation
def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({allowed})")


def _one_of(c: TrialConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(c, name)
    _require(value in choices, name, value, f"allowed: {', '.join(choices)}")


def _validate(c: TrialConfig) -> None:
    from pf_sweep.data.registry import is_known_dataset  # light import: no torch models, no TF

    _require(
        c.eval_interpolation in (None, *INTERPOLATIONS[:-1]),
        "eval_interpolation",
        c.eval_interpolation,
        f"allowed: {', '.join(INTERPOLATIONS[:-1])}, or None for the training one",
    )
    _validate_model_kwargs(c.model_kwargs)
    from pf_sweep.evaluate import SUITES  # light: names only

    suites = [name for name, sets in SUITES.items() if sets]
    _require(c.eval_suite in (None, *suites), "eval_suite", c.eval_suite, f"allowed: {', '.join(suites)}, or None")
    _require(
        c.nesterov is None or c.opt in ("sgd", "sgdw", "momentum"),
        "nesterov",
        c.nesterov,
        "only for opt sgd, sgdw or momentum",
    )
    for name in ("method", "perturbation", "loss", "opt", "sched", "rho_policy", "interpolation", "bce_reduction"):
        _one_of(
            c,
            name,
            {
                "method": METHODS,
                "perturbation": PERTURBATIONS,
                "loss": LOSSES,
                "opt": OPTIMIZERS,
                "sched": SCHEDULES,
                "rho_policy": RHO_POLICIES,
                "interpolation": INTERPOLATIONS,
                "bce_reduction": BCE_REDUCTIONS,
            }[name],
        )
    if not is_known_model(c.model):  # the suggestion compares against every timm name: only on failure
        own = ", ".join(sorted(_own_models()))
        hint = _did_you_mean(c.model)
        _require(False, "model", c.model, f"neither a timm model (see timm.list_models()) nor one of {own}{hint}")
    for dataset in (c.dataset, *(name for name, _ in c.eval_sets)):
        _require(is_known_dataset(dataset), "dataset", dataset, "allowed: digits, digits_spurious, synthetic, tfds/<name>")
    for name in ("batch_size", "epochs", "grad_accum_steps", "num_workers", "lr_base_size", "checkpoint_every"):
        _require(getattr(c, name) >= 1, name, getattr(c, name), "must be >= 1")
    for name in ("loader_workers", "warmup_epochs", "log_every", "max_failures", "train_eval_size"):
        _require(getattr(c, name) >= 0, name, getattr(c, name), "must be >= 0")
    for name in ("rho", "min_rho", "weight_decay", "momentum", "gsam_alpha", "warmup_lr", "min_lr", "drop"):
        _require(getattr(c, name) >= 0, name, getattr(c, name), "must be >= 0")
    _require(c.lr is None or c.lr > 0, "lr", c.lr, "must be > 0, or None to use lr_base scaling")
    _require(c.lr_base > 0, "lr_base", c.lr_base, "must be > 0")
    _require(c.drop < 1, "drop", c.drop, "must be < 1")
    _require(0 <= c.smoothing < 1, "smoothing", c.smoothing, "must be in [0, 1)")
    _require(0 <= c.snp_factor <= 1, "snp_factor", c.snp_factor, "must be in [0, 1]")
    _require(c.clip_grad is None or c.clip_grad > 0, "clip_grad", c.clip_grad, "must be > 0 or None")
    _require(c.cpus_per_worker > 0, "cpus_per_worker", c.cpus_per_worker, "must be > 0")
    _require(c.gpus_per_worker > 0, "gpus_per_worker", c.gpus_per_worker, "must be > 0 (use_gpu=False for none)")
    # NCCL refuses two ranks on one GPU, and a fractional share lets Ray place them there.
    _require(
        c.gpus_per_worker >= 1 or c.num_workers == 1 or not c.use_gpu,
        "gpus_per_worker",
        c.gpus_per_worker,
        "must be >= 1 when num_workers > 1 (NCCL cannot run two ranks on one GPU)",
    )
    _require(c.img_size is None or c.img_size >= 1, "img_size", c.img_size, "must be >= 1")
    _require(c.num_classes is None or c.num_classes >= 2, "num_classes", c.num_classes, "must be >= 2")
    _require(c.crop_pct is None or 0 < c.crop_pct <= 1, "crop_pct", c.crop_pct, "must be in (0, 1]")
    _require(c.hflip is None or 0 <= c.hflip <= 1, "hflip", c.hflip, "must be in [0, 1]")
    if c.scale is not None:
        _require(0 < c.scale[0] <= c.scale[1] <= 1, "scale", c.scale, "need 0 < low <= high <= 1")
    if c.ratio is not None:
        _require(0 < c.ratio[0] <= c.ratio[1], "ratio", c.ratio, "need 0 < low <= high")
    if c.mean is not None or c.std is not None:
        _require(c.mean is not None and c.std is not None, "mean/std", (c.mean, c.std), "set both or neither")
        _require(len(c.mean) == len(c.std), "mean/std", (c.mean, c.std), "need the same length")
        _require(all(s > 0 for s in c.std), "std", c.std, "must be > 0")
    _require(0 <= c.obf_gamma <= 1, "obf_gamma", c.obf_gamma, "must be in [0, 1]")
    _require(not 0 <= c.obf_C <= 1, "obf_C", c.obf_C, "must be > 1, or < 0 for lambda = 0")

    # cross-field rules
    if c.sharpness_m is not None:
        _require(
            c.sharpness_m >= 1 and c.batch_size % c.sharpness_m == 0,
            "sharpness_m",
            c.sharpness_m,
            f"must be a positive divisor of the per-worker batch_size {c.batch_size}",
        )
        _require(c.uses_sam, "sharpness_m", c.sharpness_m, "only meaningful with a SAM method, not method='sgd'")
    _require(c.gsam_alpha == 0 or c.method == "gsam", "gsam_alpha", c.gsam_alpha, "only with method='gsam'")
    _require(c.method != "gsam" or c.gsam_alpha > 0, "gsam_alpha", c.gsam_alpha, "method='gsam' needs gsam_alpha > 0")
    _require(not c.backup_normalized or c.method == "gsam", "backup_normalized", True, "only with method='gsam'")
    asam = c.asam_before_norm or c.asam_after_norm
    _require(not asam or c.method == "asam", "asam_before_norm/asam_after_norm", True, "only with method='asam'")
    _require(
        c.method != "asam" or asam,
        "method",
        "asam",
        "ASAM needs asam_before_norm=True and/or asam_after_norm=True (both: the original ASAM)",
    )
    _require(c.perturbation == "max" or c.uses_sam, "perturbation", c.perturbation, "method='sgd' has no perturbation")
    _require(
        c.rho_policy == "constant" or c.min_rho <= c.rho,
        "min_rho",
        c.min_rho,
        f"must be <= rho ({c.rho}) with rho_policy='lr_prop'",
    )
    _require(c.warmup_epochs < c.epochs or c.warmup_epochs == 0, "warmup_epochs", c.warmup_epochs, "must be < epochs")
    for pair in c.eval_sets:
        _require(all(pair), "eval_sets", c.eval_sets, "each entry is a non-empty (dataset, split) pair")


# TrialConfig fields that build_model passes to timm itself: setting them in model_kwargs would be ambiguous.
_MODEL_ARGS_OF_FIELDS = {"num_classes": "num_classes", "in_chans": "the dataset", "img_size": "img_size", "drop_rate": "drop"}


def _validate_model_kwargs(kwargs: dict[str, Any]) -> None:
    _require(all(isinstance(k, str) for k in kwargs), "model_kwargs", kwargs, "keys must be strings")
    for key, field in _MODEL_ARGS_OF_FIELDS.items():
        _require(key not in kwargs, "model_kwargs", kwargs, f"{key!r} is set by {field}, not model_kwargs")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        _require(False, "model_kwargs", kwargs, "values must be JSON (numbers, strings, booleans, lists, dicts)")


# ---------------------------------------------------------------------- model names
# `@register_model` followed (after any other decorators) by the function whose name is the model's.
_REGISTERED = re.compile(r"^@register_model(?:\(\))?[ \t]*\n(?:@.*\n)*def[ \t]+(\w+)", re.MULTILINE)
# register_model_deprecations(__name__, {"old_name": "new_name.tag", ...}): old names timm still builds.
_DEPRECATIONS = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)", re.DOTALL)


def _registered_in(files: list[Path]) -> frozenset[str]:
    names: set[str] = set()
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if "register_model" not in text:
            continue
        names.update(_REGISTERED.findall(text))
        for body in _DEPRECATIONS.findall(text):
            names.update(re.findall(r"[\'\"]([\w.]+)[\'\"]\s*:", body))
    return frozenset(names)


@functools.cache
def _own_models() -> frozenset[str]:
    """pf-sweep's models (``pf_sweep/models.py``), read from its source: importing it loads torch and timm."""
    return _registered_in([Path(__file__).with_name("models.py")])


@functools.cache
def _timm_models() -> frozenset[str]:
    """timm's model names, read from its sources without importing it (importing timm loads torch: 5 s).

    The same names as ``timm.list_models()`` plus the deprecated ones it still builds (checked by
    tests/test_bad_input.py against timm's registry). Empty when timm is absent or its layout changed.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    return _registered_in(sorted(Path(spec.submodule_search_locations[0], "models").rglob("*.py")))


def is_known_model(name: str) -> bool:
    """Whether timm (or pf-sweep) builds ``name``; a pretrained tag (``resnet50.a1_in1k``) is ignored, as in timm."""
    arch = name.split(".", 1)[0]
    if arch in _own_models():
        return True
    timm = sys.modules.get("timm")
    if timm is not None and timm.is_model(arch):  # also models a user registered with timm in this process
        return True
    known = _timm_models()
    return not known or arch in known  # a timm whose sources cannot be read is not second-guessed


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.split(".", 1)[0], sorted(_own_models() | _timm_models()), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
