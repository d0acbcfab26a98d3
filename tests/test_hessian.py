"""analysis.hessian against a dense float64 Hessian built independently with torch.autograd.functional."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from analysis import hessian

BATCH_SIZES = (5, 7, 3)  # unequal: the Hessian must be that of the mean over all 15 examples


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # 67 parameters


def make_data(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (s,), generator=gen)) for s in BATCH_SIZES
    ]


LOSS = nn.CrossEntropyLoss()


def flat_loss(model: nn.Module, data):
    """The mean loss over all examples as a function of the flat trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])

    def f(w: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = w[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return LOSS(functional_call(model, params, (x,)), y)

    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    return f, w0


@pytest.fixture
def setup():
    model, data = make_mlp(), make_data()
    f, w0 = flat_loss(model, data)
    dense = torch.autograd.functional.hessian(f, w0)
    return model, data, f, w0, dense


def test_lanczos_top_eigenvalues_match_dense(setup):
    model, data, _, _, dense = setup
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3].tolist()
    values = hessian.top_eigenvalues(model, LOSS, data, k=3, tol=1e-10)
    assert values == sorted(values, reverse=True)
    np.testing.assert_allclose(values, exact, rtol=1e-4)


def test_power_iteration_matches_dense(setup):
    model, data, _, _, dense = setup
    eig = torch.linalg.eigvalsh(dense)
    by_magnitude = sorted(eig.tolist(), key=abs, reverse=True)[:2]  # power iteration finds the largest |lambda|
    values, info = hessian.top_eigenvalues(model, LOSS, data, k=2, method="power", tol=1e-12, maxiter=3000, return_info=True)
    np.testing.assert_allclose(values, sorted(by_magnitude, reverse=True), rtol=1e-4)
    assert info["converged"]
    assert info["n_hvp"] <= 2 * 3000


@pytest.mark.parametrize("method", ["auto", "forward_over_reverse", "double_backward"])
def test_hvp_methods_match_dense_product(setup, method):
    model, data, _, w0, dense = setup
    v = torch.randn(w0.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(hessian.hvp(model, LOSS, data, v, method=method), dense @ v, rtol=1e-10, atol=1e-12)


def test_hvp_matches_finite_differences_of_the_gradient(setup):
    model, data, f, w0, _ = setup
    v = torch.randn(w0.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    grad = torch.func.grad(f)
    fd = (grad(w0 + eps * v) - grad(w0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(hessian.hvp(model, LOSS, data, v), fd, rtol=1e-6, atol=1e-8)


def test_auto_falls_back_to_double_backward_once(setup, monkeypatch, caplog):
    model, data, *_, dense = setup

    def broken(self, v):
        raise RuntimeError("no forward-mode rule")

    monkeypatch.setattr(hessian._HessianOperator, "_forward_over_reverse", broken)
    with caplog.at_level(logging.WARNING, logger="analysis.hessian"):
        values, info = hessian.top_eigenvalues(model, LOSS, data, tol=1e-10, return_info=True)
    assert info["hvp_method"] == "double_backward"
    assert sum("forward-over-reverse HVP failed" in r.message for r in caplog.records) == 1
    assert values[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)


def test_cached_graph_gives_the_same_products_and_counts_them(setup):
    model, data, _, _, dense = setup
    values, info = hessian.top_eigenvalues(model, LOSS, data, k=2, tol=1e-10, cache_graph=True, return_info=True)
    np.testing.assert_allclose(values, torch.linalg.eigvalsh(dense).flip(0)[:2].tolist(), rtol=1e-6)
    assert info["hvp_method"] == "double_backward"
    assert info["n_hvp"] > 2


def test_only_trainable_parameters_are_measured(setup):
    model, data, *_ = setup
    model[0].weight.requires_grad_(False)
    f, w0 = flat_loss(model, data)  # the remaining 8 + 24 + 3 = 35 parameters
    dense = torch.autograd.functional.hessian(f, w0)
    values, info = hessian.top_eigenvalues(model, LOSS, data, tol=1e-10, return_info=True)
    assert info["n_params"] == 35
    assert values[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)


def hutchinson_stderr(dense: torch.Tensor, n_probes: int) -> float:
    """Exact standard error of Hutchinson with Rademacher probes: Var(z^T H z) = 2 sum_{i != j} H_ij^2."""
    off = dense - torch.diag(torch.diag(dense))
    return math.sqrt(2 * float((off**2).sum()) / n_probes)


def test_hutchinson_trace_within_three_stderr(setup):
    model, data, _, _, dense = setup
    estimate, stderr = hessian.trace(model, LOSS, data, method="hutchinson", n_probes=200, seed=5)
    exact = float(torch.trace(dense))
    assert abs(estimate - exact) < 3 * stderr
    assert stderr == pytest.approx(hutchinson_stderr(dense, 200), rel=0.3)  # the reported stderr is honest


def test_hutchpp_trace_within_three_stderr(setup):
    model, data, _, _, dense = setup
    estimate, stderr = hessian.trace(model, LOSS, data, n_probes=60, seed=6)
    assert 0 < stderr < hutchinson_stderr(dense, 60)  # the sketch removed the top of the spectrum
    assert abs(estimate - float(torch.trace(dense))) < 3 * stderr


def test_hutchpp_is_exact_when_the_sketch_spans_the_space(setup):
    model, data, _, w0, dense = setup
    estimate, stderr, info = hessian.trace(model, LOSS, data, n_probes=3 * w0.numel(), return_info=True)
    assert estimate == pytest.approx(float(torch.trace(dense)), rel=1e-9)
    assert stderr == 0.0
    assert info["n_hvp"] == 2 * w0.numel()  # the residual probes are skipped


def test_density_weights_sum_to_one_and_first_moment_estimates_mean_eigenvalue(setup):
    model, data, _, w0, dense = setup
    n_probes = 20
    nodes, weights = hessian.density(model, LOSS, data, n_iter=30, n_probes=n_probes, seed=7)
    assert nodes.shape == weights.shape
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert (weights >= 0).all()
    n = w0.numel()
    stderr = hutchinson_stderr(dense, n_probes) / n
    assert abs(float(weights @ nodes) - float(torch.trace(dense)) / n) < 3 * stderr


def test_density_with_full_krylov_space_recovers_the_spectrum(setup):
    model, data, _, w0, dense = setup
    nodes, weights = hessian.density(model, LOSS, data, n_iter=w0.numel(), seed=8)
    eig = torch.linalg.eigvalsh(dense).numpy()
    heavy = nodes[weights > 1e-8]
    assert np.abs(heavy[:, None] - eig[None, :]).min(axis=1).max() < 1e-8  # every node is an eigenvalue
    np.testing.assert_allclose([nodes.min(), nodes.max()], [eig.min(), eig.max()], rtol=1e-8, atol=1e-10)


def test_density_curve_integrates_the_weights():
    nodes, weights = np.array([-1.0, 0.5, 2.0]), np.array([0.2, 0.3, 0.5])
    grid = np.linspace(-3, 4, 4001)
    curve = hessian.density_curve(nodes, weights, grid, sigma=0.1)
    assert np.trapezoid(curve, grid) == pytest.approx(1.0, rel=1e-6)
    assert np.trapezoid(curve * grid, grid) == pytest.approx(float(weights @ nodes), rel=1e-6)


def make_bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(7)
    model.train()
    model[3].eval()  # a submodule with its own mode must get it back
    return model


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, d: hessian.hvp(m, LOSS, d, torch.ones(sum(p.numel() for p in m.parameters()))),
        lambda m, d: hessian.top_eigenvalues(m, LOSS, d, k=2),
        lambda m, d: hessian.top_eigenvalues(m, LOSS, d, method="power", maxiter=5),
        lambda m, d: hessian.trace(m, LOSS, d, n_probes=9),
        lambda m, d: hessian.density(m, LOSS, d, n_iter=5),
    ],
    ids=["hvp", "lanczos", "power", "trace", "density"],
)
def test_measures_leave_the_model_and_global_rng_untouched(measure):
    model = make_bn_model()
    data = [(x.float(), y) for x, y in make_data()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measure(model, data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert torch.equal(torch.get_rng_state(), rng)


def test_hessian_uses_batchnorm_running_statistics():
    model = make_bn_model()
    data = [(x.float(), y) for x, y in make_data()]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(9))
    ours = hessian.hvp(model, LOSS, data, v)
    model.eval()
    f, w0 = flat_loss(model, data)
    torch.testing.assert_close(ours, torch.autograd.functional.hvp(f, w0, v)[1], rtol=1e-4, atol=1e-5)


def test_seed_fixes_the_estimate(setup):
    model, data, *_ = setup
    a = hessian.trace(model, LOSS, data, method="hutchinson", n_probes=10, seed=1)
    b = hessian.trace(model, LOSS, data, method="hutchinson", n_probes=10, seed=1)
    c = hessian.trace(model, LOSS, data, method="hutchinson", n_probes=10, seed=2)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, d: hessian.hvp(m, LOSS, d, torch.ones(3)), "v: shape"),
        (lambda m, d: hessian.hvp(m, LOSS, d, torch.ones(67), method="fast"), "hvp_method"),
        (lambda m, d: hessian.top_eigenvalues(m, LOSS, d, k=67), "k: 67"),
        (lambda m, d: hessian.top_eigenvalues(m, LOSS, d, method="qr"), "method"),
        (lambda m, d: hessian.trace(m, LOSS, d, n_probes=2), "n_probes"),
        (lambda m, d: hessian.trace(m, LOSS, d, hvp_method="forward_over_reverse", cache_graph=True), "cache_graph"),
        (lambda m, d: hessian.density(m, LOSS, d, n_iter=0), "n_iter"),
        (lambda m, d: hessian.hvp(m, LOSS, [], torch.ones(67)), "data"),
    ],
)
def test_invalid_arguments_raise_value_error(setup, call, match):
    model, data, *_ = setup
    with pytest.raises(ValueError, match=match):
        call(model, data)


def test_lanczos_without_convergence_returns_what_converged(setup, caplog):
    model, data, *_ = setup
    with caplog.at_level(logging.WARNING, logger="analysis.hessian"):
        values, info = hessian.top_eigenvalues(model, LOSS, data, k=3, tol=1e-14, maxiter=1, ncv=7, return_info=True)
    assert not info["converged"]
    assert len(values) < 3
    assert "converged" in caplog.text


def test_float32_model_runs_lanczos_in_single_precision_within_tol(setup):
    model, data, _, _, dense = setup
    values, info = hessian.top_eigenvalues(model.float(), LOSS, [(x.float(), y) for x, y in data], k=2, return_info=True)
    assert info["converged"]
    np.testing.assert_allclose(values, torch.linalg.eigvalsh(dense).flip(0)[:2].tolist(), rtol=1e-3)


def test_the_first_forward_over_reverse_hvp_of_a_process_warns_nothing():
    # torch.func.jvp's first call imports torch's JVP decompositions, which warn about torch.jit.script;
    # with warnings as errors that import would fail and 'auto' would fall back to double backward.
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\nfrom torch import nn\nfrom analysis import hessian\n"
        "torch.manual_seed(0)\nmodel = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))\n"
        "x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))\n"
        "print(hessian.top_eigenvalues(model, nn.functional.cross_entropy, [(x, y)], k=1))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HVP failed" not in out.stderr and "Warning" not in out.stderr, out.stderr[-2000:]
