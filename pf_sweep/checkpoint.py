"""A trial checkpoint: a directory with ``state.pt`` (tensors and plain containers), ``config.json``
and ``metrics.json`` (every report so far, readable without torch), plus ``examples.npz`` when the
trial records example forgetting (``record_examples``).

``examples.npz`` (numpy, no pickle: ``np.load(path, allow_pickle=False)``) holds ``clean`` and
``perturbed``, uint8 arrays shaped (epochs recorded, examples in the train split): 1 = correct,
0 = wrong, 255 = not presented that epoch (or, in ``perturbed``, no perturbed pass: ``method='sgd'``);
``epochs`` (the epoch of each row), ``indices`` (the train-split index of each column), ``labels``
(the label of each column, -1 if never seen) and ``has_perturbed`` (a 0-d bool).

``state.pt`` only ever holds what ``torch.load(weights_only=True)`` accepts, so loading a checkpoint
from shared storage cannot execute code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EXAMPLES_FILE = "examples.npz"


def save_checkpoint(
    directory: str | Path,
    state: dict[str, Any],
    config: dict[str, Any],
    history: list[dict],
    examples: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the files; ``state.pt`` (and ``examples.npz``) go through a temporary name so a crash never leaves half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if examples is not None:  # before state.pt: a checkpoint that has its state has its record
        save_examples(directory, examples)
    tmp = directory / (STATE_FILE + ".tmp")
    import torch  # here, not at the top: a sweep's driver reads these file names without loading torch

    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    (directory / METRICS_FILE).write_text(json.dumps(history))
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The saved state plus ``config`` and ``history``; tensors load with ``weights_only=True``."""
    directory = Path(directory)
    import torch

    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    state["config"] = json.loads((directory / CONFIG_FILE).read_text())
    metrics = directory / METRICS_FILE
    state["history"] = json.loads(metrics.read_text()) if metrics.exists() else []
    return state


def save_examples(directory: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``examples.npz`` (uncompressed: it is rewritten at every checkpoint)."""
    path = Path(directory) / EXAMPLES_FILE
    tmp = path.with_name(EXAMPLES_FILE + ".tmp")
    with open(tmp, "wb") as f:  # a file object, so numpy does not append its own ".npz"
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_examples(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The example record saved in a checkpoint directory, or None when it has none."""
    path = Path(directory) / EXAMPLES_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
