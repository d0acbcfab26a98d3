"""m-sharpness of a trained model: worst case, average case and one SAM ascent step.

Definitions follow Andriushchenko et al. 2023 (*A modern look at the relationship between sharpness and
generalization*). With c = |w| (``adaptive=True``) or c = 1, and S ranging over consecutive sub-batches
of ``m`` examples of ``data`` (concatenated in order; the last sub-batch keeps the remainder):

    worst case    E_S max_{||delta / c||_p <= rho} L_S(w + delta) - L_S(w)
    average case  E_delta L(w + delta) - L(w),  delta ~ N(0, rho^2 diag(c^2))
    SAM           E_S L_S(w + e_S) - L_S(w),  e_S = rho g_S / ||g_S||  (ASAM: rho c^2 g_S / ||c g_S||)

E_S weights each sub-batch by its size (a plain mean when m divides the data). All trainable parameters
are perturbed, BatchNorm/LayerNorm affine ones included; a weight that is exactly 0 stays 0 under
``adaptive`` (c = 0). The model runs in eval mode (BatchNorm on running statistics, never updated) and is
left bit-identical, train/eval flags included. Randomness comes from a local generator seeded by ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from analysis._params import (
    Batch,
    FlatModel,
    LossFn,
    check_choice,
    check_positive_int,
    generator,
    load_batches,
    measuring,
    randn,
    sub_batches,
    weighted_mean,
)

NORMS = ("linf", "l2")
INITS = ("zero", "random")
_MOMENTUM = 0.75  # Auto-PGD's alpha: weight of the new projected step against the previous move
_STALL_RATIO = 0.75  # Auto-PGD halves the step when fewer than this fraction of iterations improved


def _check_rho(rho: float) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho: {rho!r} must be a finite number >= 0")
    return float(rho)


def _scale(fm: FlatModel, adaptive: bool) -> torch.Tensor:
    """c: |w| for adaptive sharpness, 1 otherwise."""
    return fm.w0.abs() if adaptive else torch.ones_like(fm.w0)


def checkpoints(n_iters: int) -> list[int]:
    """Auto-PGD's step-size checkpoints (Croce & Hein 2020): iteration counts ceil(p_j n_iters) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), below ``n_iters``."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = sorted({math.ceil(round(q * n_iters, 9)) for q in p[1:]})
    return [i for i in points if 0 < i < n_iters]


def worst_case(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    rho: float,
    m: int = 128,
    adaptive: bool = True,
    norm: str = "linf",
    *,
    n_iters: int = 20,
    init: str = "zero",
    n_restarts: int = 1,
    seed: int = 0,
) -> float:
    """Worst-case m-sharpness: E_S max_{||delta / c||_p <= rho} L_S(w + delta) - L_S(w).

    Solved per sub-batch in the scaled variable u = delta / c, where the constraint set is the plain
    ball ||u||_p <= rho and the gradient is c * g (so the adaptive L2 ellipsoid is handled exactly by a
    Euclidean projection of u, and a zero weight is never moved). Auto-PGD-style ascent, ``n_iters``
    gradient evaluations per restart:

    - step: ``norm="l2"``: u + eta (c g) / ||c g||, projected by rescaling onto ||u||_2 <= rho;
      ``norm="linf"``: u + eta sign(c g), clipped to [-rho, rho] (the box |delta_i| <= rho c_i);
    - momentum: u_{k+1} = P(u_k + 0.75 (z - u_k) + 0.25 (u_k - u_{k-1})) with z the projected step;
    - eta starts at 2 rho; at Auto-PGD's checkpoints (:func:`checkpoints`) it is halved, and the
      iterate restarts from the best point, when fewer than 75% of the iterations since the last
      checkpoint improved the loss or neither eta nor the best loss changed;
    - the best loss over all iterates (the zero perturbation included) is kept, so the value is >= 0
      and is a lower bound of the true maximum.

    ``init="zero"`` starts at delta = 0 (as the reference code does); ``"random"`` or restarts after the
    first start from a seeded uniform point of the set (uniform in the box, or Gaussian direction on the
    L2 sphere of radius rho); the best over ``n_restarts`` counts.
    """
    rho = _check_rho(rho)
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    check_positive_int("n_iters", n_iters)
    check_positive_int("n_restarts", n_restarts)
    gen = generator(seed)
    with measuring(model):
        fm = FlatModel(model, loss_fn)
        chunks = sub_batches(load_batches(data, fm.device), m)
        c = _scale(fm, adaptive)
        values = [_worst_case_batch(fm, x, y, c, rho, norm, n_iters, init, n_restarts, gen) for x, y in chunks]
    return weighted_mean(values, chunks)


def _worst_case_batch(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    c: torch.Tensor,
    rho: float,
    norm: str,
    n_iters: int,
    init: str,
    n_restarts: int,
    gen: torch.Generator,
) -> float:
    def objective(u: torch.Tensor, need_grad: bool = True) -> tuple[float, torch.Tensor | None]:
        w = fm.w0 + c * u
        if not need_grad:
            return fm.loss_value(w, x, y), None
        loss, g = fm.loss_and_grad(w, x, y)
        return loss, c * g

    zero = torch.zeros_like(fm.w0)
    clean, clean_grad = objective(zero)
    best = clean
    if rho == 0:
        return 0.0
    for restart in range(n_restarts):
        if restart == 0 and init == "zero":
            start = (zero, clean, clean_grad)
        else:
            u0 = _random_point(fm.n, rho, norm, gen, fm.w0) * (c != 0)
            start = (u0, *objective(u0))
        best = max(best, _apgd(objective, start, rho, norm, n_iters))
    return best - clean


def _random_point(n: int, rho: float, norm: str, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).to(like) * rho
    u = randn(n, gen, like)
    return u * (rho / torch.linalg.vector_norm(u))


def _apgd(
    objective: Callable[..., tuple[float, torch.Tensor | None]],
    start: tuple[torch.Tensor, float, torch.Tensor | None],
    rho: float,
    norm: str,
    n_iters: int,
) -> float:
    """Best loss found by Auto-PGD-style ascent from ``start`` = (u, loss(u), gradient in u)."""
    project = _project_l2 if norm == "l2" else _project_linf
    direction = _direction_l2 if norm == "l2" else torch.sign
    marks = set(checkpoints(n_iters))
    u, loss, grad = start
    u_prev = u
    best, best_u, best_grad = loss, u, grad
    eta = 2 * rho
    n_improved, last_mark, eta_at_mark, best_at_mark = 0, 0, eta, best
    for i in range(1, n_iters + 1):
        z = project(u + eta * direction(grad), rho)
        u_new = z if i == 1 else project(u + _MOMENTUM * (z - u) + (1 - _MOMENTUM) * (u - u_prev), rho)
        u_prev, u = u, u_new
        loss, grad = objective(u, need_grad=i < n_iters)  # the last iterate needs no gradient
        if loss > best:
            best, best_u, best_grad = loss, u, grad
            n_improved += 1
        if i in marks:
            stalled = n_improved < _STALL_RATIO * (i - last_mark)
            unchanged = eta == eta_at_mark and best == best_at_mark
            n_improved, last_mark, eta_at_mark, best_at_mark = 0, i, eta, best
            if stalled or unchanged:
                eta /= 2
                u = u_prev = best_u
                grad = best_grad
    return best


def _direction_l2(g: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(g)
    return g / norm if norm > 0 else torch.zeros_like(g)


def _project_l2(u: torch.Tensor, rho: float) -> torch.Tensor:
    norm = float(torch.linalg.vector_norm(u))
    return u * (rho / norm) if norm > rho else u


def _project_linf(u: torch.Tensor, rho: float) -> torch.Tensor:
    return u.clamp(-rho, rho)


def average_case(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    rho: float,
    adaptive: bool = True,
    n_samples: int = 20,
    *,
    seed: int = 0,
) -> float:
    """Average-case sharpness: mean over ``n_samples`` seeded draws delta = rho c z, z ~ N(0, I), of
    L(w + delta) - L(w), the loss over all of ``data`` (batches weighted by size).

    Each draw perturbs the whole data at once: the expectation is linear in the loss, so splitting
    into sub-batches of m would change only the Monte Carlo noise, not the value estimated.
    delta is not rescaled to norm rho: each coordinate has standard deviation rho c_i.
    """
    rho = _check_rho(rho)
    check_positive_int("n_samples", n_samples)
    gen = generator(seed)
    with measuring(model):
        fm = FlatModel(model, loss_fn)
        batches = load_batches(data, fm.device)
        c = _scale(fm, adaptive)
        clean = fm.mean_loss(fm.w0, batches)
        increases = [fm.mean_loss(fm.w0 + rho * c * randn(fm.n, gen, fm.w0), batches) - clean for _ in range(n_samples)]
    return sum(increases) / n_samples


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    rho: float,
    m: int = 128,
    *,
    adaptive: bool = False,
    eps: float = 1e-12,
) -> float:
    """The loss increase of one SAM ascent step, averaged over sub-batches of ``m`` examples:
    E_S L_S(w + e_S) - L_S(w) with g_S = grad L_S(w) and

    - e_S = rho g_S / (||g_S|| + eps) (SAM), or
    - e_S = rho c^2 g_S / (||c g_S|| + eps), c = |w| (``adaptive=True``: ASAM, both |w| scalings).

    A first-order lower bound of the worst-case L2 sharpness (standard or adaptive) at the same rho
    and m. Deterministic: no seed.
    """
    rho = _check_rho(rho)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: {eps!r} must be a positive finite number")
    with measuring(model):
        fm = FlatModel(model, loss_fn)
        chunks = sub_batches(load_batches(data, fm.device), m)
        c = _scale(fm, adaptive)
        values = []
        for x, y in chunks:
            clean, g = fm.loss_and_grad(fm.w0, x, y)
            e = rho * c * (c * g) / (torch.linalg.vector_norm(c * g) + eps)
            values.append(fm.loss_value(fm.w0 + e, x, y) - clean)
    return weighted_mean(values, chunks)
