"""Models (pf_sweep.models) and trial checkpoints (pf_sweep.checkpoint).

Pretrained loading is checked tensor by tensor against the saved source model, whose weights and
BatchNorm buffers are randomised first so that a fresh initialisation can never pass for a load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import pf_sweep.models  # noqa: F401 - registers pf_cnn_* / pf_mlp with timm
from pf_sweep.checkpoint import CONFIG_FILE, METRICS_FILE, STATE_FILE, load_checkpoint, save_checkpoint
from pf_sweep.config import TrialConfig
from pf_sweep.data import get_source
from pf_sweep.models import build_model

DIGITS_INFO = get_source("digits").info(None)


def source_model(name: str = "pf_cnn_small", num_classes: int = 10, seed: int = 1) -> nn.Module:
    """A model whose every tensor (weights and BN buffers) is random and far from a fresh init."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, in_chans=1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor).abs() + 0.1)  # positive, so running_var stays valid
            else:
                tensor.fill_(17)  # num_batches_tracked
    return model


def body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------- timm registration


@pytest.mark.parametrize("name", ["pf_cnn_small", "pf_cnn_tiny"])
def test_small_cnns_are_created_by_timm_name(name):
    model = timm.create_model(name, num_classes=10, in_chans=1)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_pf_mlp_is_created_by_timm_name_with_img_size():
    model = timm.create_model("pf_mlp", num_classes=4, in_chans=3, img_size=6)
    assert model(torch.zeros(2, 3, 6, 6)).shape == (2, 4)


def test_timm_lists_the_registered_models():
    assert {"pf_cnn_tiny", "pf_cnn_small", "pf_mlp"} <= set(timm.list_models("pf_*"))


def test_small_cnn_classifier_is_its_head_and_reset_changes_the_class_count():
    model = timm.create_model("pf_cnn_small", num_classes=10, in_chans=1)
    assert model.get_classifier() is model.head
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.get_classifier().in_features == 128


# ----------------------------------------------------------------------------------------- build_model


@pytest.mark.parametrize("model_name", ["pf_cnn_small", "pf_cnn_tiny", "pf_mlp"])
def test_build_model_for_digits_outputs_ten_logits_per_example(model_name):
    model = build_model(TrialConfig(model=model_name), DIGITS_INFO)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_build_model_uses_config_num_classes_over_the_dataset_default():
    model = build_model(TrialConfig(num_classes=7), DIGITS_INFO)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


def test_build_model_takes_channels_and_size_from_synthetic_hints():
    info = get_source("synthetic").info(None, img_size=12, num_classes=3)
    model = build_model(TrialConfig(dataset="synthetic", model="pf_mlp", img_size=12, num_classes=3), info)
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 3)


def test_head_init_bias_sets_every_classifier_bias():
    model = build_model(TrialConfig(head_init_bias=-2.5), DIGITS_INFO)
    assert torch.equal(model.get_classifier().bias, torch.full((10,), -2.5))


def test_without_head_init_bias_the_classifier_bias_is_not_constant():
    model = build_model(TrialConfig(), DIGITS_INFO)
    assert model.get_classifier().bias.unique().numel() > 1


def test_build_model_sets_dropout_from_config():
    model = build_model(TrialConfig(drop=0.3), DIGITS_INFO)
    assert model.drop.p == 0.3


# ----------------------------------------------------------------------------------------- pretrained_path


def save_trial_checkpoint(directory: Path, model: nn.Module) -> Path:
    state = {"model": model.state_dict(), "epoch": 4, "optimizer": {"state": {}, "param_groups": []}}
    return save_checkpoint(directory, state, TrialConfig().to_dict(), [{"epoch": 0, "val/top1": 50.0}])


def test_pretrained_checkpoint_loads_the_body_and_reinitialises_a_head_of_another_size(tmp_path):
    src = source_model(num_classes=10)
    save_trial_checkpoint(tmp_path / "ckpt", src)
    torch.manual_seed(2)
    model = build_model(TrialConfig(num_classes=5, pretrained_path=str(tmp_path / "ckpt")), DIGITS_INFO)
    own = model.state_dict()
    assert_same_tensors(body(own), body(src.state_dict()))
    assert own["head.weight"].shape == (5, 128) and own["head.bias"].shape == (5,)
    assert not torch.equal(own["head.weight"], src.state_dict()["head.weight"][:5])
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)


def test_pretrained_checkpoint_with_the_same_class_count_loads_the_head_too(tmp_path):
    src = source_model(num_classes=10)
    save_trial_checkpoint(tmp_path / "ckpt", src)
    model = build_model(TrialConfig(pretrained_path=str(tmp_path / "ckpt")), DIGITS_INFO)
    assert_same_tensors(model.state_dict(), src.state_dict())


def test_head_init_bias_applies_after_pretrained_loading(tmp_path):
    src = source_model(num_classes=10)
    save_trial_checkpoint(tmp_path / "ckpt", src)
    model = build_model(TrialConfig(pretrained_path=str(tmp_path / "ckpt"), head_init_bias=0.25), DIGITS_INFO)
    assert torch.equal(model.get_classifier().bias, torch.full((10,), 0.25))
    assert torch.equal(model.get_classifier().weight, src.head.weight)


def test_pretrained_path_may_be_the_state_file_itself(tmp_path):
    src = source_model(num_classes=10)
    save_trial_checkpoint(tmp_path / "ckpt", src)
    model = build_model(TrialConfig(num_classes=5, pretrained_path=str(tmp_path / "ckpt" / STATE_FILE)), DIGITS_INFO)
    assert_same_tensors(body(model.state_dict()), body(src.state_dict()))


def test_plain_state_dict_file_loads_as_pretrained_weights(tmp_path):
    src = source_model(num_classes=10)
    torch.save(src.state_dict(), tmp_path / "weights.pt")
    model = build_model(TrialConfig(num_classes=5, pretrained_path=str(tmp_path / "weights.pt")), DIGITS_INFO)
    assert_same_tensors(body(model.state_dict()), body(src.state_dict()))
    assert model.head.out_features == 5


def test_ddp_module_prefix_is_stripped_from_pretrained_keys(tmp_path):
    src = source_model(num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pt")
    model = build_model(TrialConfig(pretrained_path=str(tmp_path / "ddp.pt")), DIGITS_INFO)
    assert_same_tensors(model.state_dict(), src.state_dict())


def test_pretrained_weights_of_another_body_raise_value_error(tmp_path):
    save_trial_checkpoint(tmp_path / "tiny", source_model("pf_cnn_tiny"))
    with pytest.raises(ValueError, match=r"does not fit SmallCNN: shape mismatches \['features\.0\.weight'"):
        build_model(TrialConfig(model="pf_cnn_small", pretrained_path=str(tmp_path / "tiny")), DIGITS_INFO)


def test_pretrained_weights_with_missing_body_tensors_raise_value_error(tmp_path):
    state = source_model().state_dict()
    del state["features.1.running_mean"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing \['features\.1\.running_mean'\]"):
        build_model(TrialConfig(pretrained_path=str(tmp_path / "partial.pt")), DIGITS_INFO)


def test_pretrained_weights_with_unexpected_tensors_raise_value_error(tmp_path):
    state = {**source_model().state_dict(), "extra.weight": torch.zeros(3)}
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected \['extra\.weight'\]"):
        build_model(TrialConfig(pretrained_path=str(tmp_path / "extra.pt")), DIGITS_INFO)


@pytest.mark.parametrize("name", ["nowhere", "nowhere.pt"])
def test_missing_pretrained_path_raises_value_error(tmp_path, name):
    with pytest.raises(ValueError, match=r"Invalid pretrained_path: .* does not exist"):
        build_model(TrialConfig(pretrained_path=str(tmp_path / name)), DIGITS_INFO)


# ----------------------------------------------------------------------------------------- checkpoint


@pytest.fixture
def trial_state() -> dict:
    model = source_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "rng": torch.get_rng_state(),
        "best": {"val/top1": 87.5},
    }


def assert_nested_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_nested_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_nested_equal(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_returns_equal_state_config_and_history(tmp_path, trial_state):
    config = TrialConfig(method="gsam", gsam_alpha=0.1, scale=(0.5, 1.0)).to_dict()
    history = [{"epoch": 0, "val/top1": 40.0}, {"epoch": 1, "val/top1": 61.25}]
    save_checkpoint(tmp_path / "ckpt", trial_state, config, history)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.pop("config") == config
    assert loaded.pop("history") == history
    assert_nested_equal(loaded, trial_state)


def test_checkpoint_config_rebuilds_the_trial_config(tmp_path, trial_state):
    cfg = TrialConfig(method="gsam", gsam_alpha=0.1, scale=(0.5, 1.0), eval_sets=(("digits", "validation"),))
    save_checkpoint(tmp_path / "ckpt", trial_state, cfg.to_dict(), [])
    assert TrialConfig.from_dict(load_checkpoint(tmp_path / "ckpt")["config"]) == cfg


def test_checkpoint_state_file_loads_with_weights_only(tmp_path, trial_state):
    save_checkpoint(tmp_path / "ckpt", trial_state, {}, [])
    raw = torch.load(tmp_path / "ckpt" / STATE_FILE, map_location="cpu", weights_only=True)
    assert_nested_equal(raw, trial_state)


def test_checkpoint_directory_holds_exactly_state_config_and_metrics(tmp_path, trial_state):
    save_checkpoint(tmp_path / "ckpt", trial_state, {}, [])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([STATE_FILE, CONFIG_FILE, METRICS_FILE])


def test_checkpoint_save_overwrites_an_earlier_checkpoint(tmp_path, trial_state):
    save_checkpoint(tmp_path / "ckpt", {"epoch": 1}, {"a": 1}, [{"epoch": 0}])
    save_checkpoint(tmp_path / "ckpt", trial_state, {"a": 2}, [{"epoch": 0}, {"epoch": 1}])
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded["epoch"] == 3 and loaded["config"] == {"a": 2} and len(loaded["history"]) == 2


def test_checkpoint_without_metrics_file_loads_an_empty_history(tmp_path, trial_state):
    save_checkpoint(tmp_path / "ckpt", trial_state, {}, [{"epoch": 0}])
    (tmp_path / "ckpt" / METRICS_FILE).unlink()
    assert load_checkpoint(tmp_path / "ckpt")["history"] == []
