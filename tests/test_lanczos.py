"""analysis._lanczos (thick-restart Lanczos) against numpy's dense symmetric eigensolver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis._lanczos import largest_eigenvalues


def random_symmetric(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (a + a.T) / 2


def start(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("ncv", [5, 8, 120])
def test_largest_eigenvalues_match_dense_through_many_restarts(ncv):
    a = random_symmetric(120, seed=0)  # a semicircle spectrum: small gaps at the top, restarts needed
    exact = np.sort(np.linalg.eigvalsh(a.numpy()))[::-1][:3]
    result = largest_eigenvalues(lambda v: a @ v, start(120), 3, tol=1e-10, ncv=ncv, max_restarts=10_000)
    assert result.converged
    np.testing.assert_allclose(result.values, exact, rtol=1e-8)
    assert (result.n_restart > 0) == (ncv < 120)  # a basis as large as the space never restarts


def test_the_test_runs_after_every_product_so_an_easy_problem_stops_before_the_basis_fills():
    diagonal = torch.cat([torch.tensor([100.0]), torch.linspace(0.0, 1.0, 499)]).double()
    result = largest_eigenvalues(lambda v: diagonal * v, start(500), 1, tol=1e-6, ncv=20, max_restarts=10)
    assert result.values[0] == pytest.approx(100.0, rel=1e-10)
    assert result.n_matvec < 10 and result.n_restart == 0
    residual_steps = []
    for steps in range(1, 20):  # the same Krylov space, stopped by hand: the first step that meets tol
        basis = torch.linalg.qr(torch.stack([diagonal**p * start(500) for p in range(steps)], dim=1)).Q
        theta, s = torch.linalg.eigh(basis.T @ (diagonal[:, None] * basis))
        y = basis @ s[:, -1]
        residual_steps.append(float(torch.linalg.vector_norm(diagonal * y - theta[-1] * y)) <= 1e-6 * float(theta[-1]))
    assert result.n_matvec == residual_steps.index(True) + 1


def test_an_exhausted_krylov_space_ends_with_its_exact_eigenvalues():
    u = start(50, seed=3)
    rank_one = 5.0 * torch.outer(u, u) / float(u @ u)  # eigenvalues 5 and 0 (49 times)
    result = largest_eigenvalues(lambda v: rank_one @ v, start(50), 2, tol=1e-8, ncv=10, max_restarts=10)
    assert result.converged and result.n_matvec == 2
    np.testing.assert_allclose(result.values, [5.0, 0.0], atol=1e-10)


def test_an_invariant_subspace_smaller_than_k_is_left_for_fresh_directions():
    result = largest_eigenvalues(lambda v: 2.0 * v, start(30), 3, tol=1e-8, ncv=6, max_restarts=10)  # A = 2 I
    assert result.converged
    np.testing.assert_allclose(result.values, [2.0, 2.0, 2.0], rtol=1e-12)


def test_out_of_restarts_returns_only_what_converged():
    a = random_symmetric(200, seed=1)
    result = largest_eigenvalues(lambda v: a @ v, start(200), 3, tol=1e-13, ncv=5, max_restarts=2)
    assert not result.converged and result.n_restart == 2 and len(result.values) < 3
    assert result.n_matvec == 5 + 2 * (5 - 4)  # a full basis, then each restart keeps 4 and adds 1


def test_a_float32_basis_reaches_float32_accuracy():
    a = random_symmetric(80, seed=2).float()
    exact = np.sort(np.linalg.eigvalsh(a.double().numpy()))[::-1][:2]
    result = largest_eigenvalues(lambda v: a @ v, start(80).float(), 2, tol=1e-4, ncv=20, max_restarts=1000)
    assert result.converged
    np.testing.assert_allclose(result.values, exact, rtol=1e-4)


@pytest.mark.parametrize("k, ncv", [(3, 3), (0, 5), (2, 31)])
def test_a_basis_size_that_cannot_work_is_refused(k, ncv):
    with pytest.raises(ValueError, match="ncv"):
        largest_eigenvalues(lambda v: v, start(30), k, tol=1e-3, ncv=ncv, max_restarts=1)
