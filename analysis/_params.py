"""Shared plumbing of the Hessian and sharpness measures: a model seen as a function of one flat
parameter vector, a guard that leaves the model exactly as it was, and fixed data.

Every measure evaluates the model through ``torch.func.functional_call`` on a flat vector ``w`` of its
trainable parameters, so the module's own tensors are never written; the guard still backs up every
parameter and buffer and copies them back, so even a model that writes to itself in ``forward`` leaves
bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (BatchNorm on running statistics, dropout off); afterwards every submodule gets
    back its own train/eval flag and every parameter and buffer its backed-up value, copied bit-exactly."""
    modes = [(module, module.training) for module in model.modules()]
    tensors = [*model.parameters(), *model.buffers()]
    backup = [t.detach().clone() for t in tensors]
    model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, saved in zip(tensors, backup, strict=True):
                t.copy_(saved)
        for module, training in modes:
            module.training = training


class FlatModel:
    """``model`` as a function of the flat vector of its trainable parameters (``requires_grad``).

    Parameters without ``requires_grad`` and all buffers (BatchNorm running statistics) are passed to
    ``functional_call`` unchanged. ``w0`` is a copy of the current trainable parameters.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: no parameter has requires_grad=True, nothing to measure")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise ValueError(f"model: trainable parameters mix dtypes {sorted(map(str, dtypes))}; cast the model to one dtype")
        self.model = model
        self.loss_fn = loss_fn
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.w0 = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
        self.frozen.update(dict(model.named_buffers()))

    @property
    def n(self) -> int:
        return self.w0.numel()

    @property
    def device(self) -> torch.device:
        return self.w0.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w0.dtype

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t.view(shape) for name, t, shape in zip(self.names, w.split(self.numels), self.shapes, strict=True)}

    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(self.model, (self.unflatten(w), self.frozen), (x,))
        return self.loss_fn(outputs, y)

    def loss_value(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.loss(w, x, y))

    def loss_and_grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(w, x, y)
            (grad,) = torch.autograd.grad(loss, w, allow_unused=True)
        return float(loss.detach()), torch.zeros_like(w) if grad is None else grad

    def mean_loss(self, w: torch.Tensor, batches: list[Batch]) -> float:
        """Loss over all examples of ``batches``, each batch weighted by its size (for a mean loss)."""
        total = sum(len(x) for x, _ in batches)
        return sum(self.loss_value(w, x, y) * len(x) for x, y in batches) / total


def load_batches(data: Iterable[Batch], device: torch.device) -> list[Batch]:
    """Read ``data`` once into memory on ``device``, so every pass of an iterative method sees the same
    examples in the same order (a shuffling DataLoader is read exactly once)."""
    batches = []
    for i, item in enumerate(data):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"data: item {i} is a {type(item).__name__}; expected an (inputs, targets) pair")
        x, y = item
        batches.append((torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)))
    if not batches or all(len(x) == 0 for x, _ in batches):
        raise ValueError("data: no examples; pass an iterable of (inputs, targets) batches")
    return [(x, y) for x, y in batches if len(x) > 0]


def sub_batches(batches: list[Batch], m: int | None) -> list[Batch]:
    """Concatenate ``batches`` and cut them into consecutive chunks of ``m`` examples. The last chunk keeps
    whatever is left (fewer than ``m``) rather than dropping examples. ``m=None`` keeps the batches as given."""
    if m is None:
        return batches
    check_positive_int("m", m)
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    return list(zip(x.split(m), y.split(m), strict=True))


def weighted_mean(values: list[float], batches: list[Batch]) -> float:
    """Mean of per-batch values weighted by batch size (a plain mean when all batches have size m)."""
    sizes = [len(x) for x, _ in batches]
    return sum(v * s for v, s in zip(values, sizes, strict=True)) / sum(sizes)


def generator(seed: int) -> torch.Generator:
    """A local CPU generator: random draws are made on the CPU (same numbers on every device) and moved;
    the global RNG is never touched."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r} is not an int")
    return torch.Generator().manual_seed(seed)


def randn(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def rademacher(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, (n,), generator=gen).to(device=like.device, dtype=like.dtype)
    return signs.mul_(2).sub_(1)


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r} must be a positive int")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")
