"""Models: any timm name, a small CPU family registered with timm, and pretrained-checkpoint init.

The CPU models are registered through ``timm.models.register_model`` so that a config names them
exactly like any timm architecture (``model="pf_cnn_small"``) and they share timm's interface
(``get_classifier``, ``reset_classifier``, ``pretrained_cfg``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models import register_model
from torch import nn

from pf_sweep.config import TrialConfig
from pf_sweep.data.registry import DatasetInfo

logger = logging.getLogger(__name__)


class _LinearHead(nn.Module):
    """timm's classifier interface for a model whose last layer is ``self.head`` on ``num_features``."""

    pretrained_cfg = {"classifier": "head"}  # noqa: RUF012 - timm reads it as an attribute

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes)


class SmallCNN(_LinearHead):
    """conv-BN-ReLU stages with a max-pool between them, global average pool, linear head."""

    def __init__(
        self, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, **_
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.drop(x))


class MLP(_LinearHead):
    """Flatten, one hidden layer, linear head: the smallest model worth sharpening."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, hidden: int = 128, drop_rate: float = 0.0, **_
    ):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, hidden), nn.ReLU(inplace=True))
        self.num_features = hidden
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


@register_model
def pf_cnn_tiny(pretrained: bool = False, **kwargs) -> SmallCNN:
    return SmallCNN((16, 32, 64), **kwargs)


@register_model
def pf_cnn_small(pretrained: bool = False, **kwargs) -> SmallCNN:
    return SmallCNN((32, 64, 128), **kwargs)


@register_model
def pf_mlp(pretrained: bool = False, **kwargs) -> MLP:
    return MLP(**kwargs)


def build_model(cfg: TrialConfig, info: DatasetInfo) -> nn.Module:
    """The model for ``cfg``: timm by name with ``model_kwargs``, head bias init, and ``pretrained_path`` weights."""
    num_classes = cfg.num_classes or info.num_classes
    kwargs = {**cfg.model_kwargs, "num_classes": num_classes, "in_chans": info.in_chans, "drop_rate": cfg.drop}
    img_size = cfg.img_size or info.image_size
    try:  # ViTs and the MLP need the input size; CNNs reject the argument
        model = timm.create_model(cfg.model, pretrained=False, img_size=img_size, **kwargs)
    except TypeError:
        model = timm.create_model(cfg.model, pretrained=False, **kwargs)
    if cfg.pretrained_path:
        load_pretrained(model, cfg.pretrained_path)
    if cfg.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, cfg.head_init_bias)
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a pf-sweep checkpoint directory, a ``state.pt`` or a plain state-dict file."""
    path = Path(path)
    if path.is_dir():
        path = path / "state.pt"
    if not path.exists():
        raise ValueError(f"Invalid pretrained_path: {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"Invalid pretrained_path: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load every matching tensor; a classifier head whose shape differs is left freshly initialised.

    Any other missing, unexpected or mismatched tensor is an error: silently training a half-loaded
    body would corrupt a sweep without anyone noticing.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = _classifier_prefixes(model)
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith(head)]
    for k in skipped:
        del state[k]
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if bad_shape or missing or unexpected:
        raise ValueError(
            f"pretrained_path {str(path)!r} does not fit {type(model).__name__}: "
            f"shape mismatches {bad_shape[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
    if skipped:
        logger.info("pretrained_path: re-initialised head tensors %s (num_classes differs)", skipped)
