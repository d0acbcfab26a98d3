"""Hessian of the training loss: Hessian-vector products, top eigenvalues, trace, spectral density.

The Hessian is that of the mean loss over all examples of ``data`` with respect to the trainable
parameters (``requires_grad``) seen as one flat vector, at the model's current weights, in eval mode
(BatchNorm on its running statistics, which are passed through unchanged). Batches are weighted by
their size, so unequal batches give the Hessian of the mean over examples, provided ``loss_fn`` is a
mean. ``data`` is read once into memory, so every HVP of an iterative method sees the same examples.

Every function leaves the model bit-identical (parameters, buffers, train/eval flags) and draws its
random vectors from a local generator seeded by ``seed``; the global RNG is untouched.

HVPs (``hvp_method``):

- ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` of a ``functional_call`` loss;
- ``"double_backward"``: ``torch.autograd.grad`` of the gradient built with ``create_graph=True``;
- ``"auto"`` (default): forward-over-reverse, falling back to double backward (once, logged) if
  ``torch.func`` raises for this model.

``cache_graph=True`` (double backward only) keeps every batch's gradient graph alive across the HVPs
of one call, so each later HVP is a single backward pass instead of forward + backward + backward.
That trades memory (one autograd graph per batch) for time: about two thirds of the cost per HVP
on CPU (resnet18, 1,024 images: 5.5 s against 7.3 s for double backward, 8.1 s forward-over-reverse).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis._lanczos import largest_eigenvalues
from analysis._params import (
    Batch,
    FlatModel,
    LossFn,
    check_choice,
    check_positive_int,
    generator,
    load_batches,
    measuring,
    rademacher,
    randn,
)

logger = logging.getLogger(__name__)

HVP_METHODS = ("auto", "forward_over_reverse", "double_backward")
EIG_METHODS = ("lanczos", "power")
TRACE_METHODS = ("hutch++", "hutchinson")
_FLOAT32_TOL = 1e-5  # below this Lanczos tolerance the basis is float64 even for a float32 model
DEFAULT_NCV = 20  # Lanczos basis vectors kept at once (memory: ncv + 1 parameter-sized vectors)


class _HessianOperator:
    """v -> H v for the flat trainable parameters, counting the products it computes."""

    def __init__(self, fm: FlatModel, batches: list[Batch], method: str = "auto", cache_graph: bool = False) -> None:
        check_choice("hvp_method", method, HVP_METHODS)
        if cache_graph and method == "forward_over_reverse":
            raise ValueError("cache_graph: True needs hvp_method 'double_backward' or 'auto' (it caches autograd graphs)")
        self.fm = fm
        self.batches = batches
        self.method = "double_backward" if cache_graph else method
        self.cache_graph = cache_graph
        self.total = sum(len(x) for x, _ in batches)
        self.n_hvp = 0
        self._graphs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(device=self.fm.device, dtype=self.fm.dtype).contiguous()
        if self.method == "auto":
            try:
                hv = self._forward_over_reverse(v)
                self.method = "forward_over_reverse"
            except Exception as err:  # torch.func does not cover every module; autograd does
                logger.warning("forward-over-reverse HVP failed (%s: %s); using double backward", type(err).__name__, err)
                self.method = "double_backward"
                hv = self._double_backward(v)
        elif self.method == "forward_over_reverse":
            hv = self._forward_over_reverse(v)
        else:
            hv = self._cached(v) if self.cache_graph else self._double_backward(v)
        self.n_hvp += 1
        return hv

    def _forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        with warnings.catch_warnings():
            # torch.func.jvp's first call imports torch's JVP decompositions, which still use
            # torch.jit.script and warn that it is deprecated: torch's own affair, not the user's.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            for x, y in self.batches:
                grad = torch.func.grad(lambda w, x=x, y=y: self.fm.loss(w, x, y))
                _, hv = torch.func.jvp(grad, (self.fm.w0,), (v,))
                out.add_(hv, alpha=len(x) / self.total)
        return out

    def _batch_gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.fm.w0.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.fm.loss(w, x, y), w, create_graph=True, allow_unused=True)
        return w, g

    def _double_backward(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for x, y in self.batches:
            w, g = self._batch_gradient(x, y)
            out.add_(_grad_of(g, w, v), alpha=len(x) / self.total)
        return out

    def _cached(self, v: torch.Tensor) -> torch.Tensor:
        if self._graphs is None:
            self._graphs = [self._batch_gradient(x, y) for x, y in self.batches]
        out = torch.zeros_like(v)
        for (w, g), (x, _) in zip(self._graphs, self.batches, strict=True):
            out.add_(_grad_of(g, w, v, retain_graph=True), alpha=len(x) / self.total)
        return out

    def info(self, **extra: Any) -> dict[str, Any]:
        return {"n_hvp": self.n_hvp, "hvp_method": self.method, "n_params": self.fm.n, **extra}


def _grad_of(g: torch.Tensor | None, w: torch.Tensor, v: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """d(g . v)/dw; zero where the gradient does not depend on w (a loss linear in the parameters)."""
    if g is None or not g.requires_grad:
        return torch.zeros_like(v)
    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(v) if hv is None else hv.detach()


def _operator(
    model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], hvp_method: str, cache_graph: bool = False
) -> _HessianOperator:
    fm = FlatModel(model, loss_fn)
    return _HessianOperator(fm, load_batches(data, fm.device), hvp_method, cache_graph)


def hvp(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], v: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """H v, the Hessian of the mean loss over ``data`` times ``v``.

    ``v`` is a 1-D tensor over the flat trainable parameters, in ``model.named_parameters()`` order
    (the order of ``torch.cat([p.reshape(-1) for p in params])``). Returns a tensor of the same shape,
    on the parameters' device and dtype.
    """
    with measuring(model):
        op = _operator(model, loss_fn, data, method)
        if not (isinstance(v, torch.Tensor) and v.shape == (op.fm.n,)):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"v: shape {shape}; expected a 1-D tensor of length {op.fm.n} (the trainable parameters)")
        return op(v).detach()


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    k: int = 1,
    *,
    method: str = "lanczos",
    tol: float = 1e-3,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    hvp_method: str = "auto",
    cache_graph: bool = False,
    return_info: bool = False,
) -> list[float] | tuple[list[float], dict[str, Any]]:
    """The ``k`` largest eigenvalues of the Hessian, as descending floats.

    ``method="lanczos"`` (default): thick-restart Lanczos with full re-orthogonalisation on HVPs, for
    the largest *algebraic* eigenvalues, so a large negative eigenvalue is never returned as "top"
    (PyHessian's power iteration returns the largest in magnitude). A Ritz value theta is accepted when
    its residual ``||H x - theta x|| <= tol |theta|``, which bounds its error by ``tol |theta|`` (and in
    practice by about ``(tol theta)^2 / gap``). The test runs after every HVP, so the iteration stops at
    the first product that meets it (ARPACK, scipy's ``eigsh``, tests only once its basis is full). The
    basis is float32 for a float32 model when ``tol >= 1e-5``, else float64. ``ncv`` is the most basis
    vectors kept at once, ``max(2k + 1, 20)`` by default: memory for ``ncv + 1`` parameter-sized
    vectors; when it fills, the best Ritz vectors are kept and the basis grows again, ``maxiter`` times
    at most (default ``10 n``).

    ``method="power"``: power iteration with deflation (each iterate orthogonalised against the
    eigenvectors already found), stopped when the Rayleigh quotient changes by less than ``tol``
    relative; ``maxiter`` (default 100) HVPs at most per eigenvalue. It finds the largest-magnitude
    eigenvalues, and its stopping rule does not bound the error when the eigengap is small.

    The start vector is a seeded Gaussian. ``return_info=True`` also returns a dict with ``n_hvp`` (HVPs
    used), ``hvp_method`` (the one that ran), ``method`` and ``converged``. If Lanczos does not converge
    within ``maxiter`` restarts, the eigenvalues that did are returned (possibly fewer than ``k``), with
    ``converged=False`` and a logged warning.
    """
    check_positive_int("k", k)
    check_choice("method", method, EIG_METHODS)
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol: {tol!r} must be a finite number >= 0")
    with measuring(model):
        op = _operator(model, loss_fn, data, hvp_method, cache_graph)
        gen = generator(seed)
        if method == "lanczos":
            values, converged = _lanczos_top(op, k, tol, maxiter, ncv, gen)
        else:
            values, converged = _power_top(op, k, tol, 100 if maxiter is None else maxiter, gen)
    values = sorted((float(v) for v in values), reverse=True)
    if return_info:
        return values, op.info(method=method, converged=converged)
    return values


def _lanczos_top(
    op: _HessianOperator, k: int, tol: float, maxiter: int | None, ncv: int | None, gen: torch.Generator
) -> tuple[np.ndarray, bool]:
    n = op.fm.n
    if k >= n:
        raise ValueError(f"k: {k} must be smaller than the number of trainable parameters ({n}) for Lanczos")
    ncv = min(n, max(2 * k + 1, DEFAULT_NCV)) if ncv is None else ncv
    if maxiter is not None:
        check_positive_int("maxiter", maxiter)
    # The basis is re-orthogonalised against every product: single precision halves that traffic and
    # suffices unless the model is float64 or tol asks for more than float32 resolves.
    dtype = torch.float64 if op.fm.dtype == torch.float64 or tol < _FLOAT32_TOL else torch.float32
    v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(device=op.fm.device, dtype=dtype)
    result = largest_eigenvalues(op, v0, k, tol=tol, ncv=ncv, max_restarts=10 * n if maxiter is None else maxiter)
    if not result.converged:  # keep what converged rather than losing every HVP spent
        logger.warning("Lanczos: %d of %d eigenvalues converged after maxiter=%s restarts", len(result.values), k, maxiter)
    return result.values, result.converged


def _power_top(op: _HessianOperator, k: int, tol: float, maxiter: int, gen: torch.Generator) -> tuple[list[float], bool]:
    check_positive_int("maxiter", maxiter)
    found: list[torch.Tensor] = []
    values: list[float] = []
    all_converged = True
    for _ in range(k):
        v = _normalised(_deflate(randn(op.fm.n, gen, op.fm.w0), found))
        value, converged = math.nan, False
        for _ in range(maxiter):
            hv = _deflate(op(v), found)
            new = float(torch.dot(v, hv))
            converged = abs(new - value) <= tol * abs(new)
            value = new
            if converged:
                break
            v = _normalised(hv)
        all_converged &= converged
        values.append(value)
        found.append(v)
    return values, all_converged


def _deflate(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for u in basis:
        v = v - torch.dot(u, v) * u
    return v


def _normalised(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v)


def trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    method: str = "hutch++",
    n_probes: int = 100,
    seed: int = 0,
    hvp_method: str = "auto",
    cache_graph: bool = False,
    return_info: bool = False,
) -> tuple[float, float] | tuple[float, float, dict[str, Any]]:
    """Estimate of tr(H) and its standard error, from exactly ``n_probes`` HVPs (no early stopping).

    ``method="hutchinson"``: mean of z^T H z over ``n_probes`` Rademacher probes z; the standard error
    is the sample standard deviation over sqrt(n_probes).

    ``method="hutch++"`` (default, Meyer et al. 2021): ``s = n_probes // 3`` Rademacher sketch vectors S,
    Q = orthonormal basis of H S; the estimate is tr(Q^T H Q) (exact, s HVPs) plus Hutchinson on the
    deflated remainder (I - QQ^T) H (I - QQ^T) with the remaining ``n_probes - 2 s`` probes. The standard
    error is that of the Hutchinson part, conditional on the sketch Q (the only random part once Q is
    drawn); it is 0 when Q spans the whole space. Hutch++ keeps ``s`` parameter-sized vectors in memory.
    """
    check_choice("method", method, TRACE_METHODS)
    check_positive_int("n_probes", n_probes)
    if n_probes < (3 if method == "hutch++" else 2):
        raise ValueError(f"n_probes: {n_probes} is too few for {method} (needs >= {3 if method == 'hutch++' else 2})")
    with measuring(model):
        op = _operator(model, loss_fn, data, hvp_method, cache_graph)
        gen = generator(seed)
        if method == "hutchinson":
            estimate, stderr = _hutchinson(op, n_probes, gen, basis=None)
        else:
            estimate, stderr = _hutchpp(op, n_probes, gen)
    if return_info:
        return estimate, stderr, op.info(method=method, n_probes=n_probes)
    return estimate, stderr


def _hutchinson(op: _HessianOperator, n_probes: int, gen: torch.Generator, basis: torch.Tensor | None) -> tuple[float, float]:
    """Hutchinson on (I - B^T B) H (I - B^T B) for orthonormal rows B, or on H itself."""
    samples = []
    for _ in range(n_probes):
        z = rademacher(op.fm.n, gen, op.fm.w0)
        if basis is not None:
            z = z - basis.T @ (basis @ z)
        samples.append(float(torch.dot(z, op(z))))
    values = np.asarray(samples)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), stderr


def _hutchpp(op: _HessianOperator, n_probes: int, gen: torch.Generator) -> tuple[float, float]:
    n_sketch = n_probes // 3
    sketch = torch.stack([op(rademacher(op.fm.n, gen, op.fm.w0)) for _ in range(n_sketch)], dim=1)
    basis = torch.linalg.qr(sketch).Q.T.contiguous()  # orthonormal rows spanning H S
    del sketch
    exact = sum(float(torch.dot(q, op(q))) for q in basis)
    if len(basis) >= op.fm.n:  # Q spans everything: the trace is exact
        return exact, 0.0
    rest, stderr = _hutchinson(op, n_probes - 2 * n_sketch, gen, basis=basis)
    return exact + rest, stderr


def density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    n_iter: int = 100,
    n_probes: int = 1,
    seed: int = 0,
    hvp_method: str = "auto",
    cache_graph: bool = False,
    return_info: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Spectral density of H by stochastic Lanczos quadrature (SLQ, Ghorbani et al. 2019).

    For each of ``n_probes`` normalised Rademacher probes, ``n_iter`` Lanczos steps with full
    re-orthogonalisation give a tridiagonal T; the symmetric eigendecomposition T = U diag(theta) U^T
    (``numpy.linalg.eigh``) gives quadrature nodes theta with weights U[0, :]^2. Returns the nodes of all
    probes concatenated and their weights divided by ``n_probes``, so the weights sum to 1 and
    ``sum(weights * nodes**p)`` estimates tr(H^p)/n. Lanczos stops early if the Krylov space is
    exhausted. Memory: ``n_iter`` parameter-sized vectors. Smooth with :func:`density_curve` to plot.
    """
    check_positive_int("n_iter", n_iter)
    check_positive_int("n_probes", n_probes)
    all_nodes, all_weights = [], []
    with measuring(model):
        op = _operator(model, loss_fn, data, hvp_method, cache_graph)
        gen = generator(seed)
        for _ in range(n_probes):
            alphas, betas = _lanczos_tridiagonal(op, _normalised(rademacher(op.fm.n, gen, op.fm.w0)), n_iter)
            nodes, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
            all_nodes.append(nodes)
            all_weights.append(vectors[0] ** 2 / n_probes)
    nodes, weights = np.concatenate(all_nodes), np.concatenate(all_weights)
    if return_info:
        return nodes, weights, op.info(n_iter=n_iter, n_probes=n_probes)
    return nodes, weights


def _lanczos_tridiagonal(op: _HessianOperator, v: torch.Tensor, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos with full re-orthogonalisation (twice, against all previous vectors) from unit ``v``."""
    steps = min(n_iter, op.fm.n)
    basis = torch.empty((steps, op.fm.n), dtype=v.dtype, device=v.device)
    basis[0] = v
    alphas: list[float] = []
    betas: list[float] = []
    tiny = 100 * torch.finfo(v.dtype).eps
    for j in range(steps):
        w = op(basis[j])
        alphas.append(float(torch.dot(w, basis[j])))
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0), 1e-300)
        if j == steps - 1 or beta <= tiny * scale:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return np.asarray(alphas), np.asarray(betas)


def density_curve(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth SLQ nodes and weights into a density on ``grid``: sum_j w_j N(grid; node_j, sigma^2).

    It integrates to sum(weights) = 1 when the grid covers the nodes by a few sigma.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma: {sigma!r} must be a positive finite number")
    grid, nodes, weights = np.asarray(grid, float), np.asarray(nodes, float), np.asarray(weights, float)
    z = (grid[:, None] - nodes[None, :]) / sigma
    return (np.exp(-0.5 * z**2) @ weights) / (sigma * math.sqrt(2 * math.pi))
