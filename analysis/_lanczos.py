"""Thick-restart Lanczos for the largest eigenvalues of a symmetric operator given as ``v -> A v``.

Why not ARPACK (``scipy.sparse.linalg.eigsh``): it tests convergence only when its basis of ``ncv``
vectors is full, so the dominant Hessian eigenvalue cost at least ``ncv`` HVPs and then whole restart
cycles of them, while each HVP of a network costs seconds. Here the Ritz values and their residual
bounds are recomputed after every product (an eigendecomposition of at most ``ncv`` x ``ncv``), so
the iteration stops at the first product that meets the tolerance.

The method (Wu & Simon 2000): Lanczos with full re-orthogonalisation (classical Gram-Schmidt, twice)
builds an orthonormal basis V with A V = V T + r e^T, T = V^T A V symmetric, whose entries are the
Gram-Schmidt coefficients. A Ritz pair (theta, y = V s) has residual ||A y - theta y|| = ||r|| |s_last|,
the bound tested. When the basis is full, the ``keep`` best Ritz vectors and the normalised residual
become the new basis (T then diagonal plus the couplings the next product computes), so no HVP spent
is lost to a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosResult:
    values: np.ndarray  # the converged largest eigenvalues, descending
    converged: bool  # all k of them
    n_matvec: int
    n_restart: int


def largest_eigenvalues(matvec: MatVec, v0: torch.Tensor, k: int, *, tol: float, ncv: int, max_restarts: int) -> LanczosResult:
    """The ``k`` largest (algebraic) eigenvalues of the symmetric operator ``matvec`` on ``len(v0)``
    dimensions, from start vector ``v0``, each accepted when its residual is at most ``tol |theta|``
    (which bounds its error by that, and in practice by about its square over the gap).

    ``ncv`` (``k < ncv <= n``) is the most basis vectors kept at once: the memory is ``ncv + 1``
    vectors shaped like ``v0``, in its dtype. At most ``max_restarts`` restarts; then the eigenvalues
    that converged so far are returned with ``converged=False``.
    """
    n = v0.numel()
    if not 0 < k < ncv <= n:
        raise ValueError(f"ncv: {ncv} must satisfy k < ncv <= n (k={k}, n={n})")
    basis = torch.empty((ncv + 1, n), dtype=v0.dtype, device=v0.device)
    basis[0] = v0 / torch.linalg.vector_norm(v0)
    proj = np.zeros((ncv, ncv))  # T = V^T A V, float64 whatever the vectors' dtype
    keep = min(ncv - 1, max(k + 1, (k + ncv) // 2))  # Ritz vectors carried over a restart
    tiny = 100 * torch.finfo(v0.dtype).eps
    j, n_matvec, n_restart = 0, 0, 0
    while True:
        w = matvec(basis[j]).to(v0.dtype).reshape(-1)
        n_matvec += 1
        coef = torch.zeros(j + 1, dtype=v0.dtype, device=v0.device)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            h = basis[: j + 1] @ w
            w = w - basis[: j + 1].T @ h
            coef += h
        proj[: j + 1, j] = proj[j, : j + 1] = coef.double().cpu().numpy()
        beta = float(torch.linalg.vector_norm(w))
        thetas, vectors = np.linalg.eigh(proj[: j + 1, : j + 1])  # ascending
        top = slice(max(0, j + 1 - k), j + 1)
        bounds = beta * np.abs(vectors[j, top])
        done = bounds <= tol * np.abs(thetas[top])
        exhausted = beta <= tiny * max(float(np.abs(proj[: j + 1, : j + 1]).max()), 1e-300)
        if (j + 1 >= k and (done.all() or exhausted)) or j + 1 == n:
            return LanczosResult(thetas[top][::-1].copy(), True, n_matvec, n_restart)
        if exhausted:  # an invariant subspace smaller than k: continue in a fresh direction
            w = _orthogonal_direction(basis[: j + 1], n_matvec)
            beta = float(torch.linalg.vector_norm(w))
        if j + 1 < ncv:
            basis[j + 1] = w / beta
            j += 1
            continue
        if n_restart >= max_restarts:
            return LanczosResult(thetas[top][done][::-1].copy(), False, n_matvec, n_restart)
        n_restart += 1
        kept = torch.as_tensor(vectors[:, -keep:], dtype=v0.dtype, device=v0.device)  # ncv x keep
        basis[:keep] = (basis[:ncv].T @ kept).T
        basis[keep] = w / beta
        proj[:] = 0.0
        proj[np.arange(keep), np.arange(keep)] = thetas[-keep:]
        j = keep


def _orthogonal_direction(basis: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random vector orthogonal to ``basis`` (unnormalised: the caller divides by its norm)."""
    gen = torch.Generator(device=basis.device).manual_seed(seed)
    w = torch.randn(basis.shape[1], generator=gen, dtype=basis.dtype, device=basis.device)
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w
