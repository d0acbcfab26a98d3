"""A trial checkpoint: a directory with ``state.pt`` (tensors and plain containers), ``config.json``
and ``metrics.json`` (every report so far, readable without torch).

``state.pt`` only ever holds what ``torch.load(weights_only=True)`` accepts, so loading a checkpoint
from shared storage cannot execute code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def save_checkpoint(directory: str | Path, state: dict[str, Any], config: dict[str, Any], history: list[dict]) -> Path:
    """Write the three files; ``state.pt`` goes through a temporary name so a crash never leaves half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    (directory / METRICS_FILE).write_text(json.dumps(history))
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The saved state plus ``config`` and ``history``; tensors load with ``weights_only=True``."""
    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    state["config"] = json.loads((directory / CONFIG_FILE).read_text())
    metrics = directory / METRICS_FILE
    state["history"] = json.loads(metrics.read_text()) if metrics.exists() else []
    return state
