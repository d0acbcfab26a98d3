"""Forgetting analysis: ``summarize`` of forget/* histories, and Toneva et al. example forgetting, from the
recorder in the train loop (``record_examples``) to ``analysis.forgetting.example_events``.

Trials run in-process on the built-in digits with a small MLP. The record's index bookkeeping is checked
against the dataset itself (the label stored for each index is the dataset's label for it) and against
the metrics the loop reports from the same forward passes (train/top1, forget/flip_rate).
"""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from analysis import forgetting
from pf_sweep.checkpoint import EXAMPLES_FILE, load_checkpoint
from pf_sweep.config import TrialConfig, parse_field_value
from pf_sweep.data import ShardedSampler, get_source
from pf_sweep.forgetting import NOT_PRESENTED, ExampleRecorder
from pf_sweep.optim import SAM
from pf_sweep.optim.sam import STAT_KEYS
from pf_sweep.session import LocalSession
from pf_sweep.train import build_data, run, run_local

X = NOT_PRESENTED
TRIAL = {"model": "pf_mlp", "epochs": 2, "lr": 0.05, "batch_size": 64, "record_examples": True}

# ----------------------------------------------------------------------------------- summarize


def test_summarize_gives_mean_last_tenth_and_final_per_forget_metric():
    flip = [0.5, 0.4, 0.3, 0.3, 0.2, 0.25, 0.2, 0.1, 0.15, 0.1, 0.05, 0.1, 0.1, 0.05, 0.0, 0.05, 0.1, 0.0, 0.05, 0.02]
    kl = [float(e) for e in range(20)]
    history = [
        {"epoch": float(e), "forget/flip_rate": f, "forget/kl": k, "val/top1": 90.0}
        for e, (f, k) in enumerate(zip(flip, kl, strict=True))
    ]
    out = forgetting.summarize(pd.DataFrame(history))
    assert set(out) == {f"forget/{m}/{s}" for m in ("flip_rate", "kl") for s in ("mean", "last10", "final")}
    assert out["forget/flip_rate/mean"] == pytest.approx(sum(flip) / 20)
    assert out["forget/flip_rate/last10"] == pytest.approx((0.05 + 0.02) / 2)  # 10% of 20 epochs: the last 2
    assert out["forget/flip_rate/final"] == 0.02
    assert out["forget/kl/last10"] == pytest.approx(18.5)


def test_summarize_orders_by_epoch_and_keeps_the_latest_report_of_a_repeated_epoch():
    rows = [
        {"epoch": 0.0, "forget/kl": 4.0},
        {"epoch": 2.0, "forget/kl": 9.0},  # reported, then the run was interrupted and resumed...
        {"epoch": 1.0, "forget/kl": 3.0},
        {"epoch": 2.0, "forget/kl": 2.0},  # ...and epoch 2 ran again: this one counts
    ]
    out = forgetting.summarize(rows)  # a list of dicts (metrics.json) works as well as a DataFrame
    assert out == pytest.approx({"forget/kl/mean": 3.0, "forget/kl/last10": 2.0, "forget/kl/final": 2.0})


def test_summarize_of_a_short_run_uses_at_least_the_last_epoch_and_skips_nans():
    out = forgetting.summarize([{"epoch": 0, "forget/kl": float("nan")}, {"epoch": 1, "forget/kl": 1.0}])
    assert out == {"forget/kl/mean": 1.0, "forget/kl/last10": 1.0, "forget/kl/final": 1.0}


def test_summarize_of_a_history_without_forgetting_is_empty_and_empty_history_raises():
    assert forgetting.summarize([{"epoch": 0, "train/loss": 1.0}]) == {}
    with pytest.raises(ValueError, match="Invalid history"):
        forgetting.summarize([])


def test_summarize_trials_gives_one_row_per_trial_equal_to_its_own_summary():
    history = pd.DataFrame(
        [
            {"sweep": "a", "trial_id": "t1", "epoch": 0, "forget/kl": 1.0},
            {"sweep": "a", "trial_id": "t1", "epoch": 1, "forget/kl": 3.0},
            {"sweep": "b", "trial_id": "t1", "epoch": 0, "forget/kl": 5.0},  # same id in another sweep
            {"sweep": "a", "trial_id": "t2", "epoch": 0, "forget/kl": 7.0},
        ]
    )
    out = forgetting.summarize_trials(history).set_index(["sweep", "trial_id"])
    assert sorted(out.index) == [("a", "t1"), ("a", "t2"), ("b", "t1")]
    for key, rows in history.groupby(["sweep", "trial_id"]):
        assert out.loc[key].to_dict() == pytest.approx(forgetting.summarize(rows))
    assert out.loc[("a", "t1"), "forget/kl/mean"] == 2.0
    empty = forgetting.summarize_trials(history.iloc[:0])
    assert empty.empty and list(empty.columns) == ["sweep", "trial_id"]


# ----------------------------------------------------------------------------------- example_events

# 5 epochs x 5 examples; X = not presented that epoch.
CLEAN = np.array(
    [
        [1, 0, 0, 0, 1],
        [1, 1, 0, X, 0],
        [1, 0, 0, 1, X],
        [1, 1, 0, X, X],
        [1, 0, 0, 0, X],
    ],
    dtype=np.uint8,
)
PERTURBED = np.array(
    [
        [1, 0, 0, 0, 0],
        [0, 0, 0, X, 0],
        [1, 0, 0, 0, X],
        [0, 0, 0, X, X],
        [X, 0, 1, 0, X],
    ],
    dtype=np.uint8,
)


def naive_events(clean: np.ndarray, perturbed: np.ndarray) -> pd.DataFrame:
    """A per-example loop over presentations, written from Toneva et al.'s definitions."""
    rows = []
    for n in range(clean.shape[1]):
        seen = [(t, int(clean[t, n])) for t in range(clean.shape[0]) if clean[t, n] != X]
        acc = [a for _, a in seen]
        pairs = list(itertools.pairwise(acc))
        forgot = sum(1 for a, b in pairs if a == 1 and b == 0)
        first = next((k for k, a in enumerate(acc) if a == 1), None)
        flips = sum(1 for t, a in seen if a == 1 and perturbed[t, n] == 0)
        rows.append(
            {
                "presentations": len(acc),
                "forgetting_events": forgot,
                "learning_events": sum(1 for a, b in pairs if a == 0 and b == 1),
                "first_learned": np.nan if first is None else float(first),
                "first_learned_epoch": np.nan if first is None else float(seen[first][0]),
                "never_learned": bool(acc) and first is None,
                "never_forgotten": first is not None and forgot == 0,
                "perturbed_flips": flips,
                "perturbed_presentations": sum(1 for t, _ in seen if perturbed[t, n] != X),
            }
        )
    return pd.DataFrame(rows)


def test_events_on_a_hand_written_record():
    events = forgetting.example_events({"clean": CLEAN, "perturbed": PERTURBED, "epochs": np.arange(5)})
    assert list(events["example"]) == [0, 1, 2, 3, 4]
    assert list(events["presentations"]) == [5, 5, 5, 3, 2]
    assert list(events["forgetting_events"]) == [0, 2, 0, 1, 1]
    assert list(events["learning_events"]) == [0, 2, 0, 1, 0]
    assert list(events["never_forgotten"]) == [True, False, False, False, False]
    assert list(events["never_learned"]) == [False, False, True, False, False]
    np.testing.assert_array_equal(events["first_learned"], [0, 1, np.nan, 1, 0])  # example 3: its 2nd presentation
    np.testing.assert_array_equal(events["first_learned_epoch"], [0, 1, np.nan, 2, 0])
    assert list(events["forgetting_score"]) == [0, 2, 5, 1, 1]  # never learned: its number of presentations
    assert list(events["perturbed_flips"]) == [2, 2, 0, 1, 1]
    assert list(events["perturbed_presentations"]) == [4, 5, 5, 3, 2]


def test_events_match_a_loop_over_presentations_on_a_random_record():
    rng = np.random.default_rng(0)
    clean = rng.choice([0, 1, X], size=(9, 300), p=[0.35, 0.55, 0.1]).astype(np.uint8)
    perturbed = np.where(clean == X, X, rng.choice([0, 1, X], size=clean.shape, p=[0.3, 0.65, 0.05])).astype(np.uint8)
    events = forgetting.example_events({"clean": clean, "perturbed": perturbed})
    expected = naive_events(clean, perturbed)
    pd.testing.assert_frame_equal(events[expected.columns], expected, check_dtype=False)


def test_plain_bool_array_is_a_record_where_every_cell_is_a_presentation():
    acc = CLEAN.copy()
    acc[acc == X] = 0
    events = forgetting.example_events(acc.astype(bool))
    expected = naive_events(acc, np.full_like(acc, X))
    pd.testing.assert_frame_equal(events[expected.columns], expected, check_dtype=False)
    assert "label" not in events


def test_forgetting_counts_summarise_the_presented_examples():
    clean = np.hstack([CLEAN, np.full((5, 1), X, np.uint8)])  # a sixth example, never presented: left out
    counts = forgetting.forgetting_counts({"clean": clean, "perturbed": np.full_like(clean, X)})
    assert counts["n_examples"] == 5
    assert counts["fraction_unforgettable"] == pytest.approx(1 / 5)
    assert counts["fraction_never_learned"] == pytest.approx(1 / 5)
    assert counts["fraction_forgotten"] == pytest.approx(3 / 5)
    assert counts["mean_forgetting_events"] == pytest.approx(4 / 5)
    assert counts["mean_learning_events"] == pytest.approx(3 / 5)
    assert np.isnan(counts["perturbed_flip_rate"])  # no perturbed pass anywhere
    with_perturbed = forgetting.forgetting_counts({"clean": CLEAN, "perturbed": PERTURBED})
    assert with_perturbed["perturbed_flip_rate"] == pytest.approx(6 / 19)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (np.array([[0, 2]], dtype=np.uint8), "Invalid record: value 2"),
        (np.zeros(4, dtype=bool), "Invalid record: shape"),
        ({"perturbed": CLEAN}, "Invalid record: keys"),
    ],
)
def test_invalid_records_raise(record, match):
    with pytest.raises(ValueError, match=match):
        forgetting.example_events(record)


# ----------------------------------------------------------------------------------- SAM per-example output


def test_sam_backward_returns_per_example_hits_of_the_clean_and_perturbed_passes():
    torch.manual_seed(0)
    teacher = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = (x @ teacher.T).argmax(-1)
    model = nn.Linear(6, 4).double()
    with torch.no_grad():  # a noisy copy of the teacher: right on most examples, not all
        model.weight.copy_(teacher + 0.7 * torch.randn(4, 6, dtype=torch.float64))
    rho, m = 0.5, 4
    expected_clean, expected_perturbed = [], []
    for s in range(0, 16, m):  # reference: e = rho g / ||g|| per sub-batch, by hand
        xs, ys = x[s : s + m], y[s : s + m]
        w, b = model.weight.detach().requires_grad_(), model.bias.detach().requires_grad_()
        gw, gb = torch.autograd.grad(F.cross_entropy(xs @ w.T + b, ys), (w, b))
        norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
        expected_clean.append((xs @ w.T + b).argmax(-1) == ys)
        expected_perturbed.append((xs @ (w + rho * gw / norm).T + b + rho * gb / norm).argmax(-1) == ys)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=rho)
    stats = sam.backward(model, x, y, F.cross_entropy, sharpness_m=m, per_example=True)
    assert torch.equal(stats["correct"], torch.cat(expected_clean))
    assert torch.equal(stats["correct_perturbed"], torch.cat(expected_perturbed))
    flipped = stats["correct"] & ~stats["correct_perturbed"]
    assert 0 < flipped.sum() < stats["correct"].sum() < 16  # some right, some flipped: the checks bite
    flips = (stats["correct"] & ~stats["correct_perturbed"]).double().mean()
    assert stats["flip_rate"].item() == pytest.approx(flips.item())


def test_sam_backward_without_per_example_returns_only_the_statistics():
    model = nn.Linear(3, 2)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    stats = sam.backward(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), F.cross_entropy)
    assert set(stats) == set(STAT_KEYS)


# ----------------------------------------------------------------------------------- config


def test_record_examples_is_off_by_default_validated_and_round_trips():
    assert TrialConfig().record_examples is False
    cfg = TrialConfig(record_examples=True)
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_field_value("record_examples", "true") is True
    with pytest.raises(ValueError, match=r"Invalid record_examples: 'yes' \(expected true or false\)"):
        TrialConfig(record_examples="yes")


# ----------------------------------------------------------------------------------- the recorder in a trial


def train_labels() -> np.ndarray:
    split = get_source("digits").split("train", None)
    return np.array([split[i][1] for i in range(len(split))])


def expected_indices(cfg: TrialConfig, epoch: int, world: int = 1) -> list[int]:
    found = []
    for rank in range(world):
        sampler = ShardedSampler(
            len(train_labels()), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, batch_multiple=cfg.batch_size
        )
        sampler.set_epoch(epoch)
        found += sampler.indices()
    return found


def assert_record_matches_the_trial(record: dict, history: pd.DataFrame, cfg: TrialConfig, world: int = 1) -> None:
    labels = train_labels()
    n = len(labels)
    assert record["clean"].shape == record["perturbed"].shape == (cfg.epochs, n)
    assert record["clean"].dtype == np.uint8
    np.testing.assert_array_equal(record["epochs"], np.arange(cfg.epochs))
    np.testing.assert_array_equal(record["indices"], np.arange(n))
    for epoch in range(cfg.epochs):
        clean = record["clean"][epoch]
        presented = np.flatnonzero(clean != X)
        indices = expected_indices(cfg, epoch, world)
        assert len(set(indices)) == len(indices)
        assert sorted(indices) == presented.tolist()  # every example of the epoch's shards once, no other
        assert len(presented) == n // (cfg.batch_size * world) * cfg.batch_size * world
        # The loop's own metrics come from the same forward passes.
        row = history[history["epoch"] == epoch].iloc[0]
        assert clean[presented].mean() * 100 == pytest.approx(row["train/top1"], rel=1e-7)
        if cfg.uses_sam:
            flipped = (clean[presented] == 1) & (record["perturbed"][epoch][presented] == 0)
            assert flipped.mean() == pytest.approx(row["forget/flip_rate"], rel=1e-6, abs=1e-9)
            assert set(np.unique(record["perturbed"][epoch][presented])) <= {0, 1}
    seen = record["labels"] >= 0
    assert seen.sum() > 0.95 * n
    np.testing.assert_array_equal(record["labels"][seen], labels[seen])  # index i holds example i's label


def test_trial_writes_the_record_into_its_checkpoint(tmp_path):
    cfg = TrialConfig(**TRIAL, method="sam")
    session = run_local(cfg, tmp_path)
    record = forgetting.load_record(session.checkpoint)
    assert_record_matches_the_trial(record, pd.DataFrame(session.history), cfg)
    assert bool(record["has_perturbed"])
    with np.load(os.path.join(session.checkpoint, EXAMPLES_FILE), allow_pickle=False) as data:
        assert set(data.files) == {"clean", "perturbed", "epochs", "indices", "labels", "has_perturbed"}
    events = forgetting.example_events(record)
    assert len(events) == len(train_labels()) and events["presentations"].max() == 2
    assert events["perturbed_flips"].sum() > 0


def test_sgd_trial_record_has_no_perturbed_pass(tmp_path):
    cfg = TrialConfig(**{**TRIAL, "epochs": 1}, method="sgd")
    session = run_local(cfg, tmp_path)
    record = forgetting.load_record(tmp_path)  # a run directory: its latest checkpoint
    assert_record_matches_the_trial(record, pd.DataFrame(session.history), cfg)
    assert not bool(record["has_perturbed"]) and (record["perturbed"] == X).all()
    assert forgetting.example_events(record)["perturbed_presentations"].sum() == 0


def test_trial_without_record_examples_writes_no_record(tmp_path):
    session = run_local(TrialConfig(**{**TRIAL, "record_examples": False, "epochs": 1}), tmp_path)
    assert not os.path.exists(os.path.join(session.checkpoint, EXAMPLES_FILE))
    with pytest.raises(ValueError, match="record_examples=True"):
        forgetting.load_record(session.checkpoint)


def test_resumed_trial_continues_the_record(tmp_path):
    cfg = TrialConfig(**{**TRIAL, "epochs": 3}, method="sam")
    full = run_local(cfg, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint_000002")  # interrupted after epoch 1
    resumed = run_local(cfg, tmp_path / "b")
    assert [row["epoch"] for row in resumed.history] == [2.0]
    before = forgetting.load_record(tmp_path / "b" / "checkpoint_000001")
    after = forgetting.load_record(resumed.checkpoint)
    np.testing.assert_array_equal(before["epochs"], [0, 1])
    expected = forgetting.load_record(full.checkpoint)
    for key in expected:
        np.testing.assert_array_equal(after[key], expected[key], err_msg=key)
    history = pd.DataFrame(load_checkpoint(resumed.checkpoint)["history"])
    assert_record_matches_the_trial(after, history, cfg)


@pytest.mark.slow  # starting the two worker processes takes seconds
def test_batch_positions_in_the_sampler_order_are_the_loaders_examples_with_two_workers():
    # The recorder's premise, on the train loader the loop builds: batch i of an epoch holds the
    # examples at positions [i B, (i + 1) B) of ShardedSampler.indices(), also from 2 worker processes.
    cfg = TrialConfig(**TRIAL, loader_workers=2)
    data = build_data(cfg, LocalSession())
    recorder = ExampleRecorder(len(train_labels()))
    for epoch in range(2):
        data.train_sampler.set_epoch(epoch)
        recorder.start_epoch(epoch, data.train_sampler.indices())
        for i, (_, y) in enumerate(data.train):
            recorder.record(i * cfg.batch_size, y, y % 2 == 0, y < 5)  # stand-ins for the two passes' hits
        recorder.end_epoch()
    record = recorder.arrays()
    labels = train_labels()
    for epoch in range(2):
        presented = np.flatnonzero(record["clean"][epoch] != X)
        assert presented.tolist() == sorted(expected_indices(cfg, epoch))
        np.testing.assert_array_equal(record["clean"][epoch][presented], labels[presented] % 2 == 0)
        np.testing.assert_array_equal(record["perturbed"][epoch][presented], labels[presented] < 5)
    assert set(expected_indices(cfg, 0)) != set(expected_indices(cfg, 1))  # the dropped tail moves
    np.testing.assert_array_equal(record["labels"][record["labels"] >= 0], labels[record["labels"] >= 0])


# ----------------------------------------------------------------------------------- two ranks

WORLD = 2


class GlooSession:
    """A rank of a 2-process gloo group; rank 0 writes checkpoints like ``LocalSession``."""

    world_size = WORLD
    device = torch.device("cpu")

    def __init__(self, rank: int, directory: str) -> None:
        self.rank, self.directory = rank, directory
        self.history: list[dict] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model  # SAM all-reduces the gradients itself once a process group exists

    def latest_checkpoint(self) -> None:
        return None

    def report(self, metrics, write_checkpoint) -> None:
        self.history.append(dict(metrics))
        if write_checkpoint is not None and self.rank == 0:
            write_checkpoint(os.path.join(self.directory, f"checkpoint_{int(metrics['epoch']):06d}"))


def _rank(rank: int, init_file: str, out_dir: str, config: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        session = GlooSession(rank, out_dir)
        run(TrialConfig.from_dict(config), session)
        pd.DataFrame(session.history).to_csv(os.path.join(out_dir, f"history{rank}.csv"), index=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_merge_their_shards_into_one_record(tmp_path):
    cfg = TrialConfig(**{**TRIAL, "batch_size": 32}, method="sam")
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path), cfg.to_dict()), nprocs=WORLD, join=True)
    record = forgetting.load_record(tmp_path)
    history = pd.read_csv(tmp_path / "history0.csv")
    assert_record_matches_the_trial(record, history, cfg, world=WORLD)
    # Each rank contributed its own shard: the merged record holds examples from both.
    for epoch in range(cfg.epochs):
        presented = set(np.flatnonzero(record["clean"][epoch] != X).tolist())
        for rank in range(WORLD):
            sampler = ShardedSampler(len(train_labels()), num_replicas=WORLD, rank=rank, shuffle=True, batch_multiple=32)
            sampler.set_epoch(epoch)
            assert set(sampler.indices()) <= presented
