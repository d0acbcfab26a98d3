"""``analysis.checkpoints.load_measurable``: a trial checkpoint back as (model, loss_fn, data)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from analysis.checkpoints import load_measurable
from pf_sweep import TrialConfig
from pf_sweep.trial import run_trial


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = TrialConfig(dataset="digits", train_split="train[:256]", epochs=1, batch_size=64, train_eval_size=64, method="sam")
    result = run_trial(cfg, local=True, storage_path=str(tmp_path_factory.mktemp("runs")), name="t")
    return result


def test_the_rebuilt_model_scores_the_validation_split_as_the_trial_reported(checkpoint):
    m = load_measurable(checkpoint.checkpoint, split="validation", n=10**6, batch_size=100)
    assert not m.model.training
    n = sum(len(y) for _, y in m.data)
    with torch.no_grad():
        correct = sum((m.model(x).argmax(-1) == y).sum().item() for x, y in m.data)
        loss = sum(m.loss_fn(m.model(x), y).item() * len(y) for x, y in m.data) / n
    assert 100.0 * correct / n == pytest.approx(checkpoint.metrics["val/top1"], abs=1e-9)
    assert loss == pytest.approx(checkpoint.metrics["val/loss"], rel=1e-5)


def test_the_first_n_examples_come_in_fixed_batches(checkpoint):
    a = load_measurable(checkpoint.checkpoint, n=150, batch_size=64)
    b = load_measurable(checkpoint.checkpoint, n=150, batch_size=64)
    assert [len(y) for _, y in a.data] == [64, 64, 22]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a.data, b.data, strict=True))


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_checkpoint_holding_pickled_code_is_refused(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.checkpoint, bad)
    torch.save({"model": _Payload()}, bad / "state.pt")
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        load_measurable(bad)
    assert "code ran" not in capsys.readouterr().out


def test_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match=r"no state\.pt"):
        load_measurable(tmp_path)
