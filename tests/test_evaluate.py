"""``pf_sweep.evaluate``: the release's evaluation suites on a checkpoint, scored as the release does
(ReaL label sets, ImageNet-R over all 1000 logits) and by Hendrycks et al.'s 200-class protocol,
checked on hand-made logits and, end to end, on ``tfds.testing.mock_data`` against a per-image loop."""

from __future__ import annotations

import json

import pytest
import torch

from pf_sweep.config import TrialConfig
from pf_sweep.evaluate import SUITES, eval_resolution, evaluate_checkpoint, main, result_file, score

# ------------------------------------------------------------------------------ scoring


def test_single_label_top1_top5_on_hand_made_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0], [9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = torch.tensor([1, 6])  # the first is top-1; the second is 2nd best, inside the top 5
    assert score(logits, labels) == {"top1": 50.0, "top5": 100.0, "count": 2.0}


def test_real_counts_a_prediction_in_the_label_set_and_drops_images_without_one():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 9.0], [5.0, 0.0, 0.0]])
    sets = torch.tensor([[0, 1], [1, 2], [-1, -1], [2, -1]])  # hit, miss, no label (dropped), miss
    result = score(logits, sets)
    assert result["count"] == 3.0
    assert result["top1"] == pytest.approx(100 / 3)
    assert result["top5"] == 100.0  # 3 classes: every set is inside the top 3


def test_imagenet_r_scored_over_all_logits_and_over_the_classes_its_labels_use():
    # Class 7 is not an ImageNet-R class: its logit wins the 1000-way argmax but not the masked one.
    logits = torch.zeros(3, 10)
    logits[:, 7] = 10.0
    logits[0, 2], logits[1, 3], logits[2, 2] = 5.0, 5.0, 5.0
    labels = torch.tensor([2, 3, 4])
    assert score(logits, labels)["top1"] == 0.0
    masked = score(logits, labels, labels.unique())
    assert masked["top1"] == pytest.approx(200 / 3) and masked["top5"] == 100.0


def test_the_release_evaluates_resnets_at_their_timm_test_size_and_vits_at_224():
    import timm

    cfg = TrialConfig(img_size=224)
    resnet = timm.create_model("resnet50", num_classes=10)
    vit = timm.create_model("vit_small_patch32_224", num_classes=10)
    assert (eval_resolution(cfg, resnet, "release"), eval_resolution(cfg, vit, "release")) == (288, 224)
    assert (eval_resolution(cfg, resnet, "train"), eval_resolution(cfg, resnet, "160")) == (224, 160)
    with pytest.raises(ValueError, match="Invalid --size 'big'"):
        eval_resolution(cfg, resnet, "big")


# ------------------------------------------------------------------------------ end to end


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny model 'trained' on mocked ImageNet: its checkpoint as a trial leaves it."""
    import tensorflow_datasets as tfds

    from pf_sweep.checkpoint import save_checkpoint
    from pf_sweep.data import get_source
    from pf_sweep.models import build_model

    cfg = TrialConfig(dataset="tfds/imagenet2012", model="pf_cnn_tiny", img_size=32, eval_interpolation="bicubic")
    with tfds.testing.mock_data(num_examples=12):
        model = build_model(cfg, get_source(cfg.dataset).info(None, img_size=32))
    torch.nn.init.normal_(model.head.weight, std=5.0)  # spread predictions over many classes
    return save_checkpoint(tmp_path / "checkpoint_000000", {"model": model.state_dict()}, cfg.to_dict(), []), cfg, model


def per_image_top1(model, cfg, dataset: str, split: str) -> float:
    """Top-1 by a loop over images: the eval transform at 32 px, one forward per image."""
    from pf_sweep.data import build_transform, get_source

    source = get_source(dataset)
    transform = build_transform(cfg, source.info(None, img_size=32), training=False)
    data = source.split(split, None)
    model.eval()
    with torch.no_grad():
        hits = [int(model(transform(image)[None]).argmax()) == int(label) for image, label in data]
    return 100.0 * sum(hits) / len(hits)


def test_the_imagenet_suite_scores_every_set_equal_to_a_per_image_loop_and_writes_beside_the_checkpoint(checkpoint):
    import tensorflow_datasets as tfds

    path, cfg, model = checkpoint
    with tfds.testing.mock_data(num_examples=12):  # every suite dataset, mocked with TFDS's default policy
        result = evaluate_checkpoint(path, "imagenet", batch_size=5)
        expected = {s.name: per_image_top1(model, cfg, s.dataset, s.split) for s in SUITES["imagenet"] if s.name != "real"}
    assert result["eval/img_size"] == 32.0  # pf_cnn_tiny has no timm test size: the training size
    for name, top1 in expected.items():
        assert result[f"eval/{name}/top1"] == pytest.approx(top1), name
        assert result[f"eval/{name}/count"] == 12.0
    assert 0 < result["eval/r200/classes"] <= 12 and result["eval/r200/top1"] >= result["eval/r/top1"]
    assert 0.0 <= result["eval/real/top1"] <= result["eval/real/top5"] <= 100.0
    assert json.loads(result_file(path, "imagenet").read_text())["eval/imagenet/top1"] == result["eval/imagenet/top1"]


def test_load_sweep_shows_a_trials_evaluation_as_columns(tmp_path):
    from analysis import load_sweep
    from pf_sweep.checkpoint import save_checkpoint

    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"space": "x", "base": {}, "settings": {}, "metric": "val/top1"}))
    cfg = TrialConfig(epochs=1)
    ckpt = save_checkpoint(sweep / "runs" / "train-a" / "checkpoint_000000", {"model": {}}, cfg.to_dict(), [{"epoch": 0}])
    result_file(ckpt, "imagenet").write_text(json.dumps({"suite": "imagenet", "eval/r200/top1": 61.5, "size": "release"}))
    trials = load_sweep(sweep)
    assert trials.loc[0, "eval/r200/top1"] == 61.5 and "size" not in trials.columns


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "imagenet21k"], "Invalid --suite 'imagenet21k' (allowed: imagenet, cifar10, cifar100, custom)"),
        (["--sets", "real,a"], "Invalid --sets 'a' for suite imagenet (its sets: imagenet, real, v2, r, sketch; or"),
        (["--suite", "custom"], "Suite custom has no sets of its own: name them with --sets DATASET:SPLIT"),
        (["--sets", "mnistt:test"], "Invalid --sets 'mnistt:test': expected DATASET:SPLIT with a known dataset"),
        (["--size", "huge"], "Invalid --size 'huge'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "state.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_target_that_is_neither_checkpoint_nor_sweep_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2 and "neither a checkpoint (no state.pt) nor a sweep" in capsys.readouterr().err


@pytest.fixture
def own_ray():
    """The local Ray evaluate_sweep starts in this process, shut down afterwards (not left to other modules)."""
    import ray

    yield
    ray.shutdown()


@pytest.mark.ray
def test_a_sweeps_final_checkpoints_are_evaluated_on_ray_and_load_sweep_shows_them(tmp_path, capsys, own_ray):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from analysis import load_sweep

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "run_sweep.py"), "--storage", str(tmp_path), "--name", "e", "--num-samples", "2"]
    cmd += ["--set", "epochs=1", "--set", "train_split=train[:256]", "--set", "train_eval_size=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main([str(tmp_path / "e"), "--suite", "custom", "--sets", "digits:validation,digits:train[:100]"]) == 0
    printed = json.loads(capsys.readouterr().out)
    trials = load_sweep(tmp_path / "e").set_index("trial_id")
    assert sorted(printed) == sorted(trials.index) and len(trials) == 2
    for trial_id, metrics in printed.items():
        # The trial's own last validation is the same model on the same split and transform.
        assert metrics["eval/digits:validation/top1"] == pytest.approx(trials.loc[trial_id, "val/top1"])
        assert trials.loc[trial_id, "eval/digits:train[:100]/count"] == 100.0


def test_a_trial_with_eval_suite_scores_the_suite_after_its_last_epoch():
    import tensorflow_datasets as tfds

    from pf_sweep.trial import run_trial

    cfg = TrialConfig(dataset="tfds/imagenet2012", model="pf_cnn_tiny", img_size=32, epochs=1, batch_size=8)
    cfg = cfg.replace(train_eval_size=8, eval_suite="imagenet")
    with tfds.testing.mock_data(num_examples=16):
        metrics = run_trial(cfg, local=True, storage_path=None).metrics
    # The suite's ImageNet validation is the trial's own validation: same model, split and transform.
    assert metrics["eval/imagenet/top1"] == pytest.approx(metrics["val/top1"])
    assert {"eval/real/top1", "eval/v2/top5", "eval/r/top1", "eval/r200/top1", "eval/sketch/count"} <= set(metrics)
    with pytest.raises(ValueError, match=r"Invalid eval_suite: 'custom' \(allowed: imagenet, cifar10, cifar100"):
        cfg.replace(eval_suite="custom")


def test_an_eval_suites_datasets_are_checked_before_any_trial(tmp_path):
    from pf_sweep.preflight import check_datasets

    cfg = TrialConfig(data_dir=str(tmp_path), eval_suite="cifar100")
    with pytest.raises(ValueError, match=r"Invalid dataset: tfds/cifar100 is not prepared in .*Prepare it once with"):
        check_datasets([cfg], on_cluster=False)
    check_datasets([cfg.replace(eval_suite=None)], on_cluster=False)  # digits alone needs nothing prepared
