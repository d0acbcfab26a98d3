"""Perturbed-forgetting statistics (docs/sam.md, "Perturbed forgetting") and the per-example recorder.

SAM already runs a clean forward pass at w and a perturbed one at w + e on the same sub-batch, so
everything here is computed from those two sets of logits: measuring forgetting costs no extra
forward pass. All results stay tensors so the caller decides when to pay for a host sync.

``ExampleRecorder`` keeps, for every training example and every epoch, whether the clean pass (and
the perturbed pass) classified it correctly: the raw material of Toneva et al. (2019) example
forgetting, analysed by ``analysis.forgetting``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

FORGETTING_KEYS = ("flip_rate", "loss_increase", "kl", "target_prob_drop")

NOT_PRESENTED = 255
"""Code of a record cell with no observation: the example was not in that epoch's shard (the sampler
drops a tail smaller than one global batch), or the method has no perturbed pass (``method='sgd'``)."""


@torch.no_grad()
def forgetting_stats(
    clean_logits: torch.Tensor,
    perturbed_logits: torch.Tensor,
    targets: torch.Tensor,
    clean_loss: torch.Tensor,
    perturbed_loss: torch.Tensor,
    *,
    per_example: bool = False,
) -> dict[str, torch.Tensor]:
    """What the perturbation made the model forget on this sub-batch.

    - ``flip_rate``: fraction of examples correct at w and wrong at w + e;
    - ``loss_increase``: L(w + e) - L(w);
    - ``kl``: mean KL(softmax z || softmax z');
    - ``target_prob_drop``: mean of p_y(w) - p_y(w + e) (softmax probabilities).

    With ``per_example`` the dict also holds ``correct`` and ``correct_perturbed``: the boolean
    per-example hits (argmax == target) that ``flip_rate`` is built from, at no extra cost.
    """
    log_p = F.log_softmax(clean_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(perturbed_logits.detach().float(), dim=-1)
    idx = targets.view(-1, 1)
    correct = log_p.argmax(dim=-1) == targets
    correct_perturbed = log_q.argmax(dim=-1) == targets
    stats = {
        "flip_rate": (correct & ~correct_perturbed).float().mean(),
        "loss_increase": (perturbed_loss.detach() - clean_loss.detach()).float(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(),
        "target_prob_drop": (log_p.gather(1, idx).exp() - log_q.gather(1, idx).exp()).mean(),
    }
    if per_example:
        stats["correct"] = correct
        stats["correct_perturbed"] = correct_perturbed
    return stats


class ExampleRecorder:
    """Per-example correctness at every presentation, indexed by dataset index into the train split.

    Each epoch it fills two device-side uint8 rows of length ``n_examples`` (clean, perturbed):
    1 = correct, 0 = wrong, ``NOT_PRESENTED`` = not seen this epoch (or no perturbed pass). Writing a
    batch is one indexed copy on the device, with no host sync; ``end_epoch`` merges the ranks (each
    example sits on exactly one rank's shard, so an elementwise minimum over ranks picks the rank
    that saw it) and moves the two rows to the host. The history lives in host memory as numpy
    arrays shaped (epochs, n_examples) and is saved beside each checkpoint (``pf_sweep.checkpoint``).

    ``labels`` holds the label the loader delivered for each index (-1 before it is seen), so the
    index bookkeeping can be checked against the dataset itself.
    """

    def __init__(self, n_examples: int, device: torch.device | str = "cpu", *, has_perturbed: bool = True) -> None:
        if n_examples < 1:
            raise ValueError(f"Invalid n_examples: {n_examples} (must be >= 1)")
        self.n_examples, self.device, self.has_perturbed = int(n_examples), torch.device(device), bool(has_perturbed)
        self.epochs: list[int] = []
        self._clean: list[np.ndarray] = []
        self._perturbed: list[np.ndarray] = []
        self.labels = np.full(self.n_examples, -1, dtype=np.int64)
        self._rows: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._order: torch.Tensor | None = None
        self._epoch: int | None = None

    # ----------------------------------------------------------------------------- one epoch
    def start_epoch(self, epoch: int, order: list[int] | torch.Tensor) -> None:
        """``order``: this rank's dataset indices for the epoch, in loader order (``ShardedSampler.indices()``)."""
        self._epoch = int(epoch)
        self._order = torch.as_tensor(order, dtype=torch.long).to(self.device)
        self._rows = torch.full((2, self.n_examples), NOT_PRESENTED, dtype=torch.uint8, device=self.device)
        self._labels = torch.full((self.n_examples,), -1, dtype=torch.long, device=self.device)

    def record(self, start: int, targets: torch.Tensor, correct: torch.Tensor, correct_perturbed: torch.Tensor | None) -> None:
        """The batch covering positions ``start : start + len(correct)`` of this epoch's order."""
        idx = self._order[start : start + correct.shape[0]]
        if idx.shape[0] != correct.shape[0]:
            raise ValueError(f"Invalid start: {start} (batch of {correct.shape[0]} runs past the epoch's {len(self._order)})")
        self._rows[0, idx] = correct.to(torch.uint8)
        if correct_perturbed is not None:
            self._rows[1, idx] = correct_perturbed.to(torch.uint8)
        if targets.dim() == 1:
            self._labels[idx] = targets.long()

    def end_epoch(self, all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Merge ranks (``all_reduce_min`` does an elementwise-min all-reduce in place) and keep the rows."""
        rows, labels = self._rows, self._labels
        if all_reduce_min is not None:
            # One collective: the (negated) labels ride along so the minimum picks the one real label.
            packed = torch.cat([rows.long(), torch.where(labels >= 0, -labels - 1, 0)[None]])
            all_reduce_min(packed)
            rows, labels = packed[:2].to(torch.uint8), -packed[2] - 1
        rows, labels = rows.cpu().numpy(), labels.cpu().numpy()
        self._clean.append(rows[0].copy())
        self._perturbed.append(rows[1].copy())
        seen = labels >= 0
        self.labels[seen] = labels[seen]
        self.epochs.append(self._epoch)
        self._rows = self._labels = self._order = None

    # ----------------------------------------------------------------------------- state
    def arrays(self) -> dict[str, np.ndarray]:
        """The record as plain numpy arrays (what ``examples.npz`` holds)."""
        shape = (0, self.n_examples)
        clean = np.stack(self._clean) if self._clean else np.zeros(shape, dtype=np.uint8)
        perturbed = np.stack(self._perturbed) if self._perturbed else np.zeros(shape, dtype=np.uint8)
        return {
            "clean": clean,
            "perturbed": perturbed,
            "epochs": np.asarray(self.epochs, dtype=np.int64),
            "indices": np.arange(self.n_examples, dtype=np.int64),
            "labels": self.labels.copy(),
            "has_perturbed": np.asarray(self.has_perturbed),
        }

    def load_arrays(self, arrays: dict[str, np.ndarray], *, before_epoch: int) -> None:
        """Continue a saved record: keep its rows for epochs < ``before_epoch`` (what a resumed run has not redone)."""
        if arrays["clean"].shape[1] != self.n_examples:
            raise ValueError(
                f"Invalid example record: {arrays['clean'].shape[1]} examples, but the train split has {self.n_examples}"
            )
        keep = [i for i, e in enumerate(arrays["epochs"].tolist()) if e < before_epoch]
        self.epochs = [int(arrays["epochs"][i]) for i in keep]
        self._clean = [np.asarray(arrays["clean"][i], dtype=np.uint8) for i in keep]
        self._perturbed = [np.asarray(arrays["perturbed"][i], dtype=np.uint8) for i in keep]
        self.labels = np.asarray(arrays["labels"], dtype=np.int64).copy()
