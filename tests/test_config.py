"""TrialConfig (pf_sweep.config): validation at construction, dict round trip, derived values, CLI parsing.

Every invalid value must raise ``ValueError`` naming the field, the value and what is allowed; the table
below pairs each bad input with a regular expression that names the field and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from pf_sweep.config import FIELD_NAMES, TrialConfig, parse_field_value

# ------------------------------------------------------------------------------- validation table

# (id, kwargs, regex the ValueError message must match: always the field name, then the rule)
BAD_INPUTS = [
    ("unknown method", {"method": "adam"}, r"Invalid method: 'adam' \(allowed: sgd, sam, gsam, asam, randsam\)"),
    ("unknown perturbation", {"perturbation": "min"}, r"Invalid perturbation: 'min' \(allowed: max, obf\)"),
    ("unknown loss", {"loss": "mse"}, r"Invalid loss: 'mse' \(allowed: ce, bce\)"),
    ("unknown opt", {"opt": "lamb"}, r"Invalid opt: 'lamb' \(allowed: sgd, sgdw, momentum, adam, adamw\)"),
    ("unknown sched", {"sched": "poly"}, r"Invalid sched: 'poly' \(allowed: cosine, linear, constant, step\)"),
    ("unknown rho_policy", {"rho_policy": "cosine"}, r"Invalid rho_policy: 'cosine' \(allowed: constant, lr_prop\)"),
    ("unknown interpolation", {"interpolation": "lanczos"}, r"Invalid interpolation: 'lanczos'"),
    ("unknown bce_reduction", {"bce_reduction": "max"}, r"Invalid bce_reduction: 'max'"),
    ("unknown dataset", {"dataset": "mnist"}, r"Invalid dataset: 'mnist' \(allowed: digits, .*tfds/<name>\)"),
    ("bare tfds prefix", {"dataset": "tfds/"}, r"Invalid dataset: 'tfds/'"),
    ("unknown eval_sets dataset", {"eval_sets": (("mnist", "test"),)}, r"Invalid dataset: 'mnist'"),
    ("empty eval_sets split", {"eval_sets": (("digits", ""),)}, r"Invalid eval_sets: .*non-empty \(dataset, split\) pair"),
    ("batch_size 0", {"batch_size": 0}, r"Invalid batch_size: 0 \(must be >= 1\)"),
    ("epochs 0", {"epochs": 0}, r"Invalid epochs: 0 \(must be >= 1\)"),
    ("negative rho", {"rho": -0.01}, r"Invalid rho: -0\.01 \(must be >= 0\)"),
    ("negative weight_decay", {"weight_decay": -1e-4}, r"Invalid weight_decay: -0\.0001 \(must be >= 0\)"),
    ("lr 0", {"lr": 0.0}, r"Invalid lr: 0\.0 \(must be > 0"),
    ("drop 1", {"drop": 1.0}, r"Invalid drop: 1\.0 \(must be < 1\)"),
    (
        "sharpness_m not dividing batch_size",
        {"batch_size": 64, "sharpness_m": 24},
        r"Invalid sharpness_m: 24 \(must be a positive divisor of the per-worker batch_size 64\)",
    ),
    ("sharpness_m 0", {"sharpness_m": 0}, r"Invalid sharpness_m: 0 \(must be a positive divisor"),
    (
        "sharpness_m with method sgd",
        {"method": "sgd", "sharpness_m": 16},
        r"Invalid sharpness_m: 16 \(only meaningful with a SAM method, not method='sgd'\)",
    ),
    ("gsam_alpha with method sam", {"method": "sam", "gsam_alpha": 0.1}, r"Invalid gsam_alpha: 0\.1 \(only with method='gsam'\)"),
    ("method gsam without alpha", {"method": "gsam"}, r"Invalid gsam_alpha: 0\.0 \(method='gsam' needs gsam_alpha > 0\)"),
    (
        "backup_normalized without gsam",
        {"backup_normalized": True},
        r"Invalid backup_normalized: True \(only with method='gsam'\)",
    ),
    (
        "asam_before_norm without asam",
        {"asam_before_norm": True},
        r"Invalid asam_before_norm/asam_after_norm: True \(only with method='asam'\)",
    ),
    (
        "asam_after_norm without asam",
        {"method": "gsam", "gsam_alpha": 0.1, "asam_after_norm": True},
        r"Invalid asam_before_norm/asam_after_norm: True \(only with method='asam'\)",
    ),
    ("method asam without switches", {"method": "asam"}, r"Invalid method: 'asam' \(ASAM needs asam_before_norm=True"),
    (
        "perturbation obf with method sgd",
        {"method": "sgd", "perturbation": "obf"},
        r"Invalid perturbation: 'obf' \(method='sgd' has no perturbation\)",
    ),
    ("obf_C 0", {"obf_C": 0.0}, r"Invalid obf_C: 0\.0 \(must be > 1, or < 0"),
    ("obf_C 0.5", {"obf_C": 0.5}, r"Invalid obf_C: 0\.5 \(must be > 1, or < 0"),
    ("obf_C 1", {"obf_C": 1.0}, r"Invalid obf_C: 1\.0 \(must be > 1, or < 0"),
    ("obf_gamma above 1", {"obf_gamma": 1.5}, r"Invalid obf_gamma: 1\.5 \(must be in \[0, 1\]\)"),
    ("smoothing 1.0", {"smoothing": 1.0}, r"Invalid smoothing: 1\.0 \(must be in \[0, 1\)\)"),
    (
        "min_rho above rho with lr_prop",
        {"rho_policy": "lr_prop", "rho": 0.05, "min_rho": 0.1},
        r"Invalid min_rho: 0\.1 \(must be <= rho \(0\.05\) with rho_policy='lr_prop'\)",
    ),
    ("warmup_epochs not below epochs", {"epochs": 3, "warmup_epochs": 3}, r"Invalid warmup_epochs: 3 \(must be < epochs\)"),
    ("batch_size given as a string", {"batch_size": "64"}, r"Invalid batch_size: '64' \(expected an integer\)"),
    ("batch_size given as a non-integral float", {"batch_size": 64.5}, r"Invalid batch_size: 64\.5 \(expected an integer\)"),
    ("batch_size given as a bool", {"batch_size": True}, r"Invalid batch_size: True \(expected an integer\)"),
    ("augment given as an int", {"augment": 1}, r"Invalid augment: 1 \(expected true or false\)"),
    ("rho given as a string", {"rho": "0.05"}, r"Invalid rho: '0\.05' \(expected a finite number\)"),
    ("model given as a number", {"model": 3}, r"Invalid model: 3 \(expected a string\)"),
    ("scale with one value", {"scale": [0.5]}, r"Invalid scale: \[0\.5\] \(expected 2 values\)"),
    ("scale not a sequence", {"scale": 0.5}, r"Invalid scale: 0\.5 \(expected a list/tuple\)"),
    ("scale low above high", {"scale": (0.9, 0.5)}, r"Invalid scale: \(0\.9, 0\.5\) \(need 0 < low <= high <= 1\)"),
    ("mean without std", {"mean": (0.5,)}, r"Invalid mean/std: .*\(set both or neither\)"),
    ("std without mean", {"std": (0.5,)}, r"Invalid mean/std: .*\(set both or neither\)"),
    ("mean and std of different lengths", {"mean": (0.5,), "std": (0.2, 0.2)}, r"Invalid mean/std: .*\(need the same length\)"),
    ("std zero", {"mean": (0.5,), "std": (0.0,)}, r"Invalid std: \(0\.0,\) \(must be > 0\)"),
    ("crop_pct 0", {"crop_pct": 0.0}, r"Invalid crop_pct: 0\.0 \(must be in \(0, 1\]\)"),
    ("crop_pct above 1", {"crop_pct": 1.5}, r"Invalid crop_pct: 1\.5 \(must be in \(0, 1\]\)"),
    ("hflip above 1", {"hflip": 2.0}, r"Invalid hflip: 2\.0 \(must be in \[0, 1\]\)"),
    ("num_classes 1", {"num_classes": 1}, r"Invalid num_classes: 1 \(must be >= 2\)"),
    ("gpu share zero", {"use_gpu": True, "gpus_per_worker": 0.0}, r"Invalid gpus_per_worker: 0.0 \(must be > 0"),
    (
        "fractional gpu with two workers",
        {"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2},
        r"Invalid gpus_per_worker: 0.5 \(must be >= 1 when num_workers > 1",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), [pytest.param(k, m, id=i) for i, k, m in BAD_INPUTS])
def test_invalid_value_raises_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrialConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"method": "gsam", "gsam_alpha": 0.1, "backup_normalized": True}, id="gsam"),
        pytest.param({"method": "asam", "asam_before_norm": True, "asam_after_norm": True}, id="asam"),
        pytest.param({"method": "sgd"}, id="sgd"),
        pytest.param({"perturbation": "obf", "obf_C": -1.0, "obf_gamma": 0.0}, id="obf lambda 0"),
        pytest.param({"batch_size": 64, "sharpness_m": 16}, id="sharpness_m divisor"),
        pytest.param({"rho_policy": "lr_prop", "rho": 0.1, "min_rho": 0.1}, id="lr_prop min_rho equal rho"),
        pytest.param({"dataset": "tfds/cifar10"}, id="tfds dataset"),
        pytest.param({"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.2, 0.2)}, id="mean and std"),
    ],
)
def test_valid_configurations_are_accepted(kwargs):
    cfg = TrialConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"batch_size": float("inf")}, r"Invalid batch_size", id="batch_size inf"),
        pytest.param({"batch_size": float("nan")}, r"Invalid batch_size", id="batch_size nan"),
        pytest.param({"epochs": float("inf")}, r"Invalid epochs", id="epochs inf"),
    ],
)
def test_integer_field_given_a_non_finite_float_raises_value_error_naming_the_field(kwargs, message):
    # json.loads accepts "Infinity", "NaN" and "1e999", so these reach TrialConfig through --set.
    with pytest.raises(ValueError, match=message):
        TrialConfig(**kwargs)


def test_parse_field_value_rejects_json_infinity_for_an_int_field_with_value_error():
    with pytest.raises(ValueError, match=r"Invalid epochs"):
        parse_field_value("epochs", "1e999")


def test_obf_C_nan_is_rejected():
    # NaN is neither > 1 nor < 0, the only values the rule allows.
    with pytest.raises(ValueError, match=r"Invalid obf_C"):
        TrialConfig(obf_C=float("nan"))


# ------------------------------------------------------------------------------- coercion, frozen


def test_list_fields_become_tuples_and_ints_become_floats():
    cfg = TrialConfig(scale=[1, 1], mean=[0], std=[1], eval_sets=[["digits", "validation"]])
    assert cfg.scale == (1.0, 1.0) and all(type(v) is float for v in cfg.scale)
    assert cfg.mean == (0.0,) and type(cfg.mean[0]) is float
    assert cfg.eval_sets == (("digits", "validation"),)
    assert type(cfg.eval_sets) is tuple and type(cfg.eval_sets[0]) is tuple


def test_integral_float_for_an_int_field_is_stored_as_int():
    cfg = TrialConfig(batch_size=32.0)
    assert cfg.batch_size == 32 and type(cfg.batch_size) is int


def test_config_is_frozen():
    cfg = TrialConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rho = 0.1  # type: ignore[misc]


# ------------------------------------------------------------------------------- dict round trip


def test_from_dict_rejects_unknown_key_with_did_you_mean_suggestion():
    with pytest.raises(ValueError, match=r"Unknown TrialConfig field\(s\): 'sharpnes_m' \(did you mean 'sharpness_m'\?\)"):
        TrialConfig.from_dict({"sharpnes_m": 16})


def test_from_dict_rejects_unknown_key_without_close_match_without_suggestion():
    with pytest.raises(ValueError, match=r"Unknown TrialConfig field\(s\): 'zzzzqqq'$"):
        TrialConfig.from_dict({"zzzzqqq": 1})


def _rich_config() -> TrialConfig:
    return TrialConfig(
        dataset="digits_spurious",
        eval_sets=(("digits_spurious", "validation_aligned"), ("digits", "validation[:50%]")),
        scale=(0.5, 1.0),
        ratio=(0.8, 1.25),
        mean=(0.4,),
        std=(0.3,),
        hflip=0.0,
        lr=0.05,
        method="gsam",
        gsam_alpha=0.2,
        backup_normalized=True,
        sharpness_m=16,
        rho_policy="lr_prop",
        min_rho=0.01,
        perturbation="obf",
        obf_C=-1.0,
        head_init_bias=-2.0,
        pretrained_path="/tmp/ckpt",
        seed=7,
    )


def test_to_dict_from_dict_round_trip_through_json_gives_an_equal_config():
    cfg = _rich_config()
    restored = TrialConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert restored.scale == (0.5, 1.0) and isinstance(restored.scale, tuple)
    assert restored.eval_sets == (("digits_spurious", "validation_aligned"), ("digits", "validation[:50%]"))


def test_to_dict_is_plain_json_with_lists_for_tuples():
    d = _rich_config().to_dict()
    assert set(d) == set(FIELD_NAMES)
    assert d["scale"] == [0.5, 1.0]
    assert d["eval_sets"] == [["digits_spurious", "validation_aligned"], ["digits", "validation[:50%]"]]
    assert json.loads(json.dumps(d)) == d


def test_replace_changes_one_field_and_keeps_the_others():
    cfg = _rich_config()
    changed = cfg.replace(batch_size=128)
    assert changed.batch_size == 128
    assert dataclasses.replace(changed, batch_size=cfg.batch_size) == cfg


def test_replace_validates_the_result():
    with pytest.raises(ValueError, match=r"Invalid sharpness_m: 16"):
        _rich_config().replace(batch_size=40)


# ------------------------------------------------------------------------------- derived values


@pytest.mark.parametrize(
    ("batch_size", "grad_accum_steps", "num_workers", "lr_base", "lr_base_size"),
    [(64, 1, 1, 0.1, 256), (32, 4, 2, 0.2, 512), (100, 3, 4, 1e-3, 64)],
)
def test_resolved_lr_scales_lr_base_linearly_with_global_batch(batch_size, grad_accum_steps, num_workers, lr_base, lr_base_size):
    cfg = TrialConfig(
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        num_workers=num_workers,
        lr_base=lr_base,
        lr_base_size=lr_base_size,
    )
    global_batch = batch_size * grad_accum_steps * num_workers
    assert cfg.global_batch_size == global_batch
    assert cfg.resolved_lr == pytest.approx(lr_base * global_batch / lr_base_size, rel=1e-12)


def test_explicit_lr_overrides_lr_base_scaling():
    cfg = TrialConfig(lr=0.037, lr_base=0.5, batch_size=512, num_workers=4)
    assert cfg.resolved_lr == 0.037


def test_uses_sam_is_false_only_for_sgd():
    assert not TrialConfig(method="sgd").uses_sam
    assert TrialConfig(method="randsam").uses_sam


# ------------------------------------------------------------------------------- parse_field_value


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        pytest.param("sharpness_m", "32", 32, id="int"),
        pytest.param("batch_size", "128", 128, id="int batch"),
        pytest.param("rho", "0.05", 0.05, id="float"),
        pytest.param("lr", "1e-3", 1e-3, id="float exponent"),
        pytest.param("augment", "false", False, id="bool false"),
        pytest.param("amp", "True", True, id="bool capitalised"),
        pytest.param("pretrained_path", "none", None, id="none"),
        pytest.param("sharpness_m", "null", None, id="null"),
        pytest.param("pretrained_path", "/runs/a/checkpoint_000003", "/runs/a/checkpoint_000003", id="raw string"),
        pytest.param("method", "gsam", "gsam", id="method string"),
        pytest.param("scale", "[0.5,1]", (0.5, 1.0), id="list to tuple"),
        pytest.param("eval_sets", '[["digits","validation"]]', (("digits", "validation"),), id="nested list to tuples"),
    ],
)
def test_parse_field_value_parses_to_the_field_type(name, text, expected):
    value = parse_field_value(name, text)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_field_value_turns_an_integer_into_a_float_for_a_float_field():
    value = parse_field_value("rho", "1")
    assert value == 1.0 and type(value) is float


def test_parse_field_value_rejects_a_value_of_the_wrong_type():
    with pytest.raises(ValueError, match=r"Invalid batch_size: 1\.5 \(expected an integer\)"):
        parse_field_value("batch_size", "1.5")


def test_parse_field_value_rejects_unknown_field_with_suggestion():
    with pytest.raises(ValueError, match=r"Unknown TrialConfig field 'sharpnes_m' \(did you mean 'sharpness_m'\?\)"):
        parse_field_value("sharpnes_m", "32")


def test_parsed_values_build_a_config():
    sets = {"batch_size": "32", "sharpness_m": "8", "scale": "[0.6, 1.0]", "augment": "false", "pretrained_path": "none"}
    cfg = TrialConfig.from_dict({name: parse_field_value(name, text) for name, text in sets.items()})
    assert (cfg.batch_size, cfg.sharpness_m, cfg.scale, cfg.augment, cfg.pretrained_path) == (32, 8, (0.6, 1.0), False, None)
