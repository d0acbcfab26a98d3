"""A trial checkpoint as the ``(model, loss_fn, data)`` every measure takes.

The checkpoint's own ``config.json`` rebuilds the model and the data with pf-sweep's builders, so
every trial of a sweep is measured on the same terms: the first ``n`` examples of a named split,
with eval transforms (no augmentation), in a fixed order, and the trial's training loss without
label smoothing (cross-entropy, or BCE for a BCE-trained model). Weights load with
``torch.load(weights_only=True)``: a checkpoint from shared storage cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pf_sweep.checkpoint import load_checkpoint
from pf_sweep.config import TrialConfig


@dataclass
class Measurable:
    """What a measure needs, plus where it came from."""

    model: nn.Module
    loss_fn: nn.Module
    data: list[tuple[torch.Tensor, torch.Tensor]]
    config: TrialConfig
    checkpoint: str


def load_measurable(
    checkpoint: str | Path, *, split: str = "train", n: int = 1024, batch_size: int = 128, interpolation: str | None = None
) -> Measurable:
    """Rebuild a checkpoint's model (eval mode) and the first ``n`` examples of ``split`` as batches.

    ``split`` uses TFDS slicing syntax on the trial's own dataset (``"train"``, ``"validation"``);
    the batches are materialised once, so every measure sees exactly the same tensors. They go
    through the trial's evaluation transform, resized with ``interpolation`` when given (the paper's
    Hessian protocol resizes bilinearly where its validation resizes bicubically).
    """
    from pf_sweep.data import TransformedSplit, build_transform, get_source
    from pf_sweep.losses import build_loss
    from pf_sweep.models import build_model

    if n < 1 or batch_size < 1:
        raise ValueError(f"Invalid n={n} or batch_size={batch_size} (both must be >= 1)")
    directory = Path(checkpoint)
    if not (directory / "state.pt").is_file():
        raise ValueError(f"No checkpoint at {directory}: it has no state.pt")
    state = load_checkpoint(directory)
    cfg = TrialConfig.from_dict(state["config"])
    source = get_source(cfg.dataset)
    hints = {"img_size": cfg.img_size, "num_classes": cfg.num_classes}
    info = source.info(cfg.data_dir, **hints)
    model = build_model(cfg.replace(pretrained_path=None), info)
    model.load_state_dict(state["model"])
    model.eval()
    transform = build_transform(cfg.replace(eval_interpolation=interpolation) if interpolation else cfg, info, training=False)
    examples = TransformedSplit(source.split(split, cfg.data_dir, **hints), transform)
    count = min(n, len(examples))
    data = []
    for start in range(0, count, batch_size):
        items = [examples[i] for i in range(start, min(start + batch_size, count))]
        data.append((torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])))
    loss_fn = build_loss(cfg.loss, smoothing=0.0, bce_reduction=cfg.bce_reduction)
    return Measurable(model=model, loss_fn=loss_fn, data=data, config=cfg, checkpoint=str(directory))
