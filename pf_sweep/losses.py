"""Training losses and SAM perturbation objectives, found by name.

A config names the training loss (``loss="ce"`` or ``"bce"``) and the perturbation objective
(``perturbation="max"`` or ``"obf"``); the registries below turn those names into modules, the way
timm's registries turn model names into models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOSSES: dict[str, Callable[..., nn.Module]] = {}
PERTURBATIONS: dict[str, Callable[..., nn.Module | None]] = {}


def _check_class_targets(targets: torch.Tensor, num_classes: int, who: str) -> None:
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{who} needs integer class-index targets, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"{who} needs 1-d class-index targets, got shape {tuple(targets.shape)}")
    del num_classes  # range is checked by one_hot itself


class OBF(nn.Module):
    r"""Output-bias forgetting perturbation objective (docs/sam.md, "OBF").

    With lambda = 1/C (C > 1; C < 0 means lambda = 0), p = sigmoid(z) (or softmax), y one-hot and u
    uniform, per example alpha = gamma * max(0, (1 - lambda / p_y) / (1 - lambda)) and

        P(z, y) = mean_batch sum_k (u_k - alpha p_k - (1 - alpha) y_k) z_k,

    with p and alpha held constant, so that dP/dz = (u - alpha p - (1 - alpha) y) / batch exactly.
    The value of P itself is not meaningful; only its gradient steers the perturbation.
    """

    def __init__(self, C: float, gamma: float = 1.0, sigmoid: bool = True) -> None:
        super().__init__()
        if 0.0 <= C <= 1.0:
            raise ValueError(f"Invalid OBF C: {C} (must be > 1, or < 0 for lambda = 0)")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"Invalid OBF gamma: {gamma} (must be in [0, 1])")
        self.C = float(C)
        self.gamma = float(gamma)
        self.sigmoid = bool(sigmoid)

    def extra_repr(self) -> str:
        return f"C={self.C}, gamma={self.gamma}, sigmoid={self.sigmoid}"

    def coefficient(self, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """alpha per example, shape (batch, 1)."""
        if self.C < 0:
            return torch.full_like(probs[:, :1], self.gamma)
        lam = 1.0 / self.C
        p_y = probs.gather(1, targets.view(-1, 1)).clamp_min(torch.finfo(probs.dtype).tiny)
        return self.gamma * ((1.0 - lam / p_y) / (1.0 - lam)).clamp_min(0.0)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_class_targets(targets, logits.shape[-1], "OBF")
        z = _at_least_fp32(logits)
        with torch.no_grad():
            probs = torch.sigmoid(z) if self.sigmoid else torch.softmax(z, dim=-1)
            alpha = self.coefficient(probs, targets)
            onehot = F.one_hot(targets, num_classes=z.shape[-1]).to(z.dtype)
            weight = 1.0 / z.shape[-1] - alpha * probs - (1.0 - alpha) * onehot
        return (weight * z).sum(dim=-1).mean()


class BinaryCrossEntropy(nn.Module):
    """Per-class sigmoid BCE on one-hot (optionally smoothed) targets.

    ``reduction`` is ``"mean"``, ``"sum"``, or ``"<classes>_<batch>"`` with each part ``sum`` or
    ``mean``: ``"sum_mean"`` sums over classes and averages over the batch, which keeps the gradient
    scale of softmax CE when there are many classes.
    """

    def __init__(self, smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Invalid BCE smoothing: {smoothing} (must be in [0, 1))")
        parts = reduction.split("_")
        if not 1 <= len(parts) <= 2 or any(p not in ("mean", "sum") for p in parts):
            raise ValueError(f"Invalid BCE reduction: {reduction!r} (allowed: mean, sum, sum_mean, mean_mean, sum_sum, mean_sum)")
        self.smoothing = float(smoothing)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = _at_least_fp32(logits)
        num_classes = z.shape[-1]
        if targets.shape != z.shape:
            _check_class_targets(targets, num_classes, "BinaryCrossEntropy")
            targets = F.one_hot(targets, num_classes=num_classes).to(z.dtype)
            if self.smoothing:
                targets = targets * (1.0 - self.smoothing) + self.smoothing / num_classes
        parts = self.reduction.split("_")
        if len(parts) == 1:
            return F.binary_cross_entropy_with_logits(z, targets, reduction=parts[0])
        per_example = F.binary_cross_entropy_with_logits(z, targets, reduction="none")
        per_example = per_example.sum(-1) if parts[0] == "sum" else per_example.mean(-1)
        return per_example.sum() if parts[1] == "sum" else per_example.mean()


class CrossEntropy(nn.CrossEntropyLoss):
    """Softmax cross-entropy with label smoothing, computed in fp32 (logits may come from autocast)."""

    def __init__(self, smoothing: float = 0.0) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Invalid CE smoothing: {smoothing} (must be in [0, 1))")
        super().__init__(label_smoothing=smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(_at_least_fp32(logits), targets)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 logits from autocast; float64 stays float64 (gradient checks rely on it)."""
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


def register(registry: dict[str, Callable[..., Any]], name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in registry:
            raise ValueError(f"{name!r} is registered twice")
        registry[name] = factory
        return factory

    return deco


@register(LOSSES, "ce")
def _ce(smoothing: float = 0.0, **_: Any) -> nn.Module:
    return CrossEntropy(smoothing)


@register(LOSSES, "bce")
def _bce(smoothing: float = 0.0, bce_reduction: str = "sum_mean", **_: Any) -> nn.Module:
    return BinaryCrossEntropy(smoothing, bce_reduction)


@register(PERTURBATIONS, "max")
def _max(**_: Any) -> None:
    return None  # SAM's standard ascent on the training loss itself


@register(PERTURBATIONS, "obf")
def _obf(obf_C: float = 1000.0, obf_gamma: float = 1.0, obf_sigmoid: bool = True, **_: Any) -> nn.Module:
    return OBF(obf_C, obf_gamma, obf_sigmoid)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """The training loss named ``name`` ("ce", "bce"); extra keyword arguments are ignored."""
    if name not in LOSSES:
        raise ValueError(f"Invalid loss: {name!r} (allowed: {', '.join(sorted(LOSSES))})")
    return LOSSES[name](**kwargs)


def build_perturbation(name: str, **kwargs: Any) -> nn.Module | None:
    """The perturbation objective named ``name``; None for "max" (ascend the training loss)."""
    if name not in PERTURBATIONS:
        raise ValueError(f"Invalid perturbation: {name!r} (allowed: {', '.join(sorted(PERTURBATIONS))})")
    return PERTURBATIONS[name](**kwargs)
