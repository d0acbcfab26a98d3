"""analysis.sharpness on a quadratic problem, where every sharpness has a closed form.

A bias-free linear model f(x) = W x under the mean squared error is quadratic in w = vec(W), so
L_S(w + d) - L_S(w) = g_S . d + d^T H_S d / 2 exactly, with g_S and H_S written below in numpy.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import nn

from analysis import sharpness

LOSS = nn.MSELoss()
D_IN, D_OUT, N = 3, 2, 8  # 6 parameters: 64 vertices of the L-infinity box


def make_problem(seed: int, zero_weight: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(D_IN, D_OUT, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64))
        if zero_weight:
            model.weight[0, 1] = 0.0
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N, D_OUT, generator=gen, dtype=torch.float64)
    return model, x, y


def quadratic(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian of mean((W x - y)^2) with respect to the row-major flat W."""
    w, xs, ys = model.weight.detach().numpy(), x.numpy(), y.numpy()
    scale = 2 / (len(xs) * w.shape[0])
    grad = scale * (w @ xs.T - ys.T) @ xs
    return grad.reshape(-1), np.kron(np.eye(w.shape[0]), scale * xs.T @ xs)


def scale_of(model: nn.Module, adaptive: bool) -> np.ndarray:
    w = model.weight.detach().numpy().reshape(-1)
    return np.abs(w) if adaptive else np.ones_like(w)


def l2_max(g: np.ndarray, h: np.ndarray, rho: float) -> float:
    """max g.u + u^T h u / 2 over ||u|| <= rho for PSD h: u = (lam I - h)^-1 g on the sphere, lam > lambda_max
    (the trust-region secular equation, solved by brentq in the eigenbasis)."""
    mu, q = np.linalg.eigh(h)
    b = q.T @ g
    lo = mu[-1] + 1e-12 * (1 + abs(mu[-1]))
    lam = brentq(lambda t: np.linalg.norm(b / (t - mu)) - rho, lo, mu[-1] + np.linalg.norm(g) / rho + 1, xtol=1e-14)
    u = b / (lam - mu)
    return float(b @ u + u @ (mu * u) / 2)


def vertex_values(g: np.ndarray, h: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """The quadratic at every vertex of the box |d_i| <= radius_i (a convex function peaks at one)."""
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=len(g))))
    d = signs * radius
    return d @ g + np.einsum("vi,ij,vj->v", d, h, d) / 2


def per_sub_batch(x: torch.Tensor, y: torch.Tensor, m: int):
    return list(zip(x.split(m), y.split(m), strict=True))


def weighted(values: list[float], chunks) -> float:
    sizes = [len(cx) for cx, _ in chunks]
    return float(np.dot(values, sizes) / sum(sizes))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_l2_solves_the_trust_region_problem(seed, adaptive):
    model, x, y = make_problem(seed, zero_weight=adaptive)
    g, h = quadratic(model, x, y)
    c = scale_of(model, adaptive)
    exact = l2_max(c * g, c[:, None] * h * c[None, :], 0.5)  # in u = delta / c the ellipsoid is a ball
    ours = sharpness.worst_case(model, LOSS, [(x[:5], y[:5]), (x[5:], y[5:])], 0.5, m=N, adaptive=adaptive, norm="l2")
    assert ours == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_linf_at_small_rho_finds_the_best_vertex(adaptive):
    model, x, y = make_problem(3)
    g, h = quadratic(model, x, y)
    exact = vertex_values(g, h, 0.05 * scale_of(model, adaptive)).max()
    assert sharpness.worst_case(model, LOSS, [(x, y)], 0.05, m=N, adaptive=adaptive) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 3, 7])
def test_worst_case_linf_is_feasible_and_at_least_one_sign_step(seed):
    """Maximising a convex quadratic over a box is hard: the ascent may stop at a local vertex, but it can
    never exceed the exhaustive maximum, and never do worse than its first step rho sign(g)."""
    model, x, y = make_problem(seed)
    g, h = quadratic(model, x, y)
    rho = 0.5
    first_step = rho * np.sign(g)
    ours = sharpness.worst_case(model, LOSS, [(x, y)], rho, m=N, adaptive=False)
    assert g @ first_step + first_step @ h @ first_step / 2 - 1e-12 <= ours <= vertex_values(g, h, np.full(6, rho)).max() + 1e-12


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_linf_with_random_restarts_finds_the_global_vertex(adaptive):
    model, x, y = make_problem(1, zero_weight=adaptive)
    g, h = quadratic(model, x, y)
    exact = vertex_values(g, h, 0.5 * scale_of(model, adaptive)).max()
    ours = sharpness.worst_case(model, LOSS, [(x, y)], 0.5, m=N, adaptive=adaptive, init="random", n_restarts=10, seed=0)
    assert ours == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("m", [1, 3, N])
def test_worst_case_averages_sub_batches_of_m(m):
    """m = 1, 3 (chunks 3, 3, 2: the remainder is kept, weighted by its size) and m = n each match the mean of
    per-sub-batch trust-region maxima, and m = 1 is sharper than m = n."""
    model, x, y = make_problem(4)
    chunks = per_sub_batch(x, y, m)
    exact = weighted([l2_max(*quadratic(model, cx, cy), 0.3) for cx, cy in chunks], chunks)
    ours = sharpness.worst_case(model, LOSS, [(x, y)], 0.3, m=m, adaptive=False, norm="l2", n_iters=40)
    assert ours == pytest.approx(exact, rel=1e-6)
    if m == 1:
        full = l2_max(*quadratic(model, x, y), 0.3)
        assert ours > 1.2 * full


def test_zero_weights_stay_unperturbed_under_adaptive_sharpness():
    model, x, y = make_problem(5)
    with torch.no_grad():
        model.weight.zero_()
    data = [(x, y)]
    assert sharpness.worst_case(model, LOSS, data, 0.5, m=N, norm="linf") == 0.0
    assert sharpness.worst_case(model, LOSS, data, 0.5, m=N, norm="l2") == 0.0
    assert sharpness.average_case(model, LOSS, data, 0.5) == 0.0
    assert sharpness.sam_sharpness(model, LOSS, data, 0.5, m=N, adaptive=True) == 0.0
    assert sharpness.worst_case(model, LOSS, data, 0.5, m=N, adaptive=False) > 0  # standard sharpness moves them


@pytest.mark.parametrize("adaptive", [False, True])
def test_average_case_matches_the_gaussian_expectation(adaptive):
    """E[g.d + d^T H d / 2] = rho^2 tr(C H C) / 2 for d ~ N(0, rho^2 C^2); the Monte Carlo error is checked
    against the exact variance rho^2 ||C g||^2 + rho^4 ||C H C||_F^2 / 2."""
    model, x, y = make_problem(6)
    g, h = quadratic(model, x, y)
    c = scale_of(model, adaptive)
    rho, n_samples = 0.2, 4000
    chc = c[:, None] * h * c[None, :]
    mean = rho**2 * np.trace(chc) / 2
    stderr = math.sqrt((rho**2 * np.sum((c * g) ** 2) + rho**4 * np.sum(chc**2) / 2) / n_samples)
    ours = sharpness.average_case(model, LOSS, [(x[:3], y[:3]), (x[3:], y[3:])], rho, adaptive=adaptive, n_samples=n_samples)
    assert abs(ours - mean) < 4 * stderr


def test_average_case_is_reproducible_from_its_seed():
    model, x, y = make_problem(6)
    rng = torch.get_rng_state()
    a = sharpness.average_case(model, LOSS, [(x, y)], 0.2, n_samples=5, seed=1)
    assert a == sharpness.average_case(model, LOSS, [(x, y)], 0.2, n_samples=5, seed=1)
    assert a != sharpness.average_case(model, LOSS, [(x, y)], 0.2, n_samples=5, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("m", [2, N])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_sharpness_is_the_loss_increase_of_one_ascent_step(m, adaptive):
    model, x, y = make_problem(7, zero_weight=True)
    c = scale_of(model, adaptive)
    chunks = per_sub_batch(x, y, m)
    values = []
    for cx, cy in chunks:
        g, h = quadratic(model, cx, cy)
        e = 0.1 * c**2 * g / np.linalg.norm(c * g)
        values.append(g @ e + e @ h @ e / 2)
    ours = sharpness.sam_sharpness(model, LOSS, [(x, y)], 0.1, m=m, adaptive=adaptive)
    assert ours == pytest.approx(weighted(values, chunks), rel=1e-9)


def test_sam_sharpness_bounds_worst_case_l2_from_below():
    model, x, y = make_problem(8)
    sam = sharpness.sam_sharpness(model, LOSS, [(x, y)], 0.3, m=4)
    assert 0 < sam <= sharpness.worst_case(model, LOSS, [(x, y)], 0.3, m=4, adaptive=False, norm="l2") + 1e-12


def make_bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(11)
    model.train()
    model[3].eval()
    return model


MEASURES = {
    "worst_linf": lambda m, d: sharpness.worst_case(m, LOSS, d, 0.05, m=4),
    "worst_l2_random": lambda m, d: sharpness.worst_case(m, LOSS, d, 0.05, m=4, norm="l2", init="random", n_restarts=2),
    "average": lambda m, d: sharpness.average_case(m, LOSS, d, 0.05, n_samples=3),
    "sam": lambda m, d: sharpness.sam_sharpness(m, LOSS, d, 0.05, m=4, adaptive=True),
}


@pytest.mark.parametrize("name", list(MEASURES))
def test_measures_leave_parameters_statistics_modes_and_rng_untouched(name):
    model = make_bn_model()
    _, x, y = make_problem(9)
    data = [(x.float(), y.float())]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    MEASURES[name](model, data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, num_batches_tracked included
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert torch.equal(torch.get_rng_state(), rng)


def test_batchnorm_models_are_measured_on_running_statistics_with_affine_parameters_perturbed():
    """An independent SAM step on an eval-mode copy, perturbing every parameter (BN affine too) in place."""
    model = make_bn_model()
    _, x, y = make_problem(10)
    x, y = x.float(), y.float()
    ref = copy.deepcopy(model).eval()
    clean = LOSS(ref(x), y)
    grads = torch.autograd.grad(clean, list(ref.parameters()))
    norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
    with torch.no_grad():
        for p, gr in zip(ref.parameters(), grads, strict=True):
            p.add_(0.05 * gr / (norm + 1e-12))
        expected = float(LOSS(ref(x), y) - clean)
    assert sharpness.sam_sharpness(model, LOSS, [(x, y)], 0.05, m=N) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, d: sharpness.worst_case(m, LOSS, d, 0.1, norm="l3"), "norm"),
        (lambda m, d: sharpness.worst_case(m, LOSS, d, -0.1), "rho"),
        (lambda m, d: sharpness.worst_case(m, LOSS, d, 0.1, m=0), "m: 0"),
        (lambda m, d: sharpness.worst_case(m, LOSS, d, 0.1, init="ones"), "init"),
        (lambda m, d: sharpness.average_case(m, LOSS, d, 0.1, n_samples=0), "n_samples"),
        (lambda m, d: sharpness.sam_sharpness(m, LOSS, d, float("nan")), "rho"),
    ],
)
def test_invalid_arguments_raise_value_error(call, match):
    model, x, y = make_problem(0)
    with pytest.raises(ValueError, match=match):
        call(model, [(x, y)])
