"""Dominant Hessian eigenvalue: ``analysis.hessian`` against the PyHessian package, on CPU.

Setting: timm ``resnet18`` (10 classes) at 32x32 inputs, ``--images`` seeded Gaussian images with random
labels in batches of 128, cross-entropy, BatchNorm in eval mode on running statistics calibrated by one
pass over the images (so eval mode is not the identity-statistics network of a fresh init). Two threads.

Rows, run round-robin per repeat (so machine noise hits every row alike), medians over ``--repeats``:

- ``pyhessian tol=T``: ``pyhessian.hessian(model, criterion, dataloader=..., cuda=False).eigenvalues(maxIter=100,
  tol=T)``, power iteration stopped on a relative change below T (which does not bound its error);
- ``ours lanczos``: ``top_eigenvalues(tol=1e-3)`` (thick-restart Lanczos, tested after every HVP,
  forward-over-reverse HVPs), whose residual test guarantees 1e-3; ``tol=0.01`` rows: the looser
  tolerance, whose eigenvalue error (about the squared residual over the gap) is checked against the
  reference like PyHessian's;
- ``ours lanczos dbl``: the same with ``hvp_method="double_backward"`` (PyHessian's kind of HVP);
- ``ours lanczos cached``: the same with ``cache_graph=True`` (double backward through graphs kept alive);
- ``ours power``: ``top_eigenvalues(method="power", tol=1e-4)``.

The reference eigenvalue is ours at ``tol=--ref-tol`` (not timed against the others). Each row reports
HVPs, wall time, the eigenvalue, its relative error, and PyHessian's time over its own, for every
PyHessian tolerance. The goal: a Lanczos row at least 3x faster than the fastest PyHessian row that reaches
the same accuracy (relative error <= 1e-3). The ``s/HVP`` column separates the HVP count from machine noise.

    .venv/bin/pip install pyhessian==0.1            # the optional "bench" extra
    .venv/bin/python benchmarks/hessian.py          # 1024 images, about 20 minutes on 2 cores
    .venv/bin/python benchmarks/hessian.py --images 256 --repeats 1   # a few minutes
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from analysis import hessian

NUM_CLASSES = 10
IMAGE_SIZE = 32
BATCH_SIZE = 128
ACCURACY_GOAL = 1e-3
SPEEDUP_GOAL = 3.0

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Row = Callable[[], tuple[float, int]]  # () -> (eigenvalue, number of HVPs)


def make_problem(model_name: str, n_images: int, seed: int) -> tuple[nn.Module, Batches]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n_images,), generator=gen)
    batches = list(zip(x.split(BATCH_SIZE), y.split(BATCH_SIZE), strict=True))
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=NUM_CLASSES)
    calibrate_batchnorm(model, batches)
    return model.eval(), batches


def calibrate_batchnorm(model: nn.Module, batches: Batches) -> None:
    """Running statistics = the exact mean/variance over the images (cumulative average, momentum None)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def pyhessian_row(model: nn.Module, batches: Batches, tol: float, seed: int) -> Row:
    from pyhessian import hessian as PyHessian

    def run() -> tuple[float, int]:
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global RNG
        h = PyHessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        count = 0
        product = h.dataloader_hv_product

        def counted(v):
            nonlocal count
            count += 1
            return product(v)

        h.dataloader_hv_product = counted
        values, _ = h.eigenvalues(maxIter=100, tol=tol)
        model.zero_grad(set_to_none=True)
        return float(values[0]), count

    return run


def ours_row(model: nn.Module, batches: Batches, seed: int, **kwargs) -> Row:
    def run() -> tuple[float, int]:
        values, info = hessian.top_eigenvalues(model, nn.CrossEntropyLoss(), batches, seed=seed, return_info=True, **kwargs)
        return values[0], info["n_hvp"]

    return run


def warm_up(model: nn.Module, batches: Batches) -> None:
    """First use of torch.func and of autograd's double backward pays one-off costs; keep them out of the rows."""
    small = [(batches[0][0][:8], batches[0][1][:8])]
    v = torch.ones(sum(p.numel() for p in model.parameters() if p.requires_grad))
    for method in ("forward_over_reverse", "double_backward"):
        hessian.hvp(model, nn.CrossEntropyLoss(), small, v, method=method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    parser.add_argument("--images", type=int, default=1024, help="number of images (default 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin repeats; medians are reported (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pyhessian-tols", default="1e-3,1e-4", help="comma-separated PyHessian tolerances")
    parser.add_argument("--ref-tol", type=float, default=1e-6, help="Lanczos tolerance of the reference eigenvalue")
    args = parser.parse_args()
    if args.images < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--images, --repeats and --threads must be positive")
    torch.set_num_threads(args.threads)

    model, batches = make_problem(args.model, args.images, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params:,} parameters, {args.images} images in batches of {BATCH_SIZE}, {args.threads} threads")
    warm_up(model, batches)

    start = time.perf_counter()
    reference, ref_hvp = ours_row(model, batches, args.seed, tol=args.ref_tol, cache_graph=True)()
    print(
        f"reference (ours, Lanczos tol={args.ref_tol:g}): {reference:.6f}, {ref_hvp} HVPs, {time.perf_counter() - start:.1f} s\n"
    )

    tols = [float(t) for t in args.pyhessian_tols.split(",")]
    rows: dict[str, Row] = {f"pyhessian tol={t:g}": pyhessian_row(model, batches, t, args.seed) for t in tols}
    for tol in (1e-3, 1e-2):
        suffix = "" if tol == 1e-3 else f" tol={tol:g}"
        rows["ours lanczos" + suffix] = ours_row(model, batches, args.seed, tol=tol, hvp_method="forward_over_reverse")
        rows["ours lanczos dbl" + suffix] = ours_row(model, batches, args.seed, tol=tol, hvp_method="double_backward")
        rows["ours lanczos cached" + suffix] = ours_row(model, batches, args.seed, tol=tol, cache_graph=True)
    rows["ours power"] = ours_row(model, batches, args.seed, method="power", tol=1e-4)

    times: dict[str, list[float]] = {name: [] for name in rows}
    results: dict[str, tuple[float, int]] = {}
    names = list(rows)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order every repeat
            start = time.perf_counter()
            results[name] = rows[name]()
            times[name].append(time.perf_counter() - start)
            print(f"  repeat {r + 1}: {name:<28} {times[name][-1]:7.1f} s", flush=True)
    report(results, {name: statistics.median(ts) for name, ts in times.items()}, reference, tols)


def report(results: dict[str, tuple[float, int]], median: dict[str, float], reference: float, tols: list[float]) -> None:
    pyh = [f"pyhessian tol={t:g}" for t in tols]
    header = f"{'method':<28} {'HVPs':>5} {'time s':>8} {'s/HVP':>6} {'eigenvalue':>12} {'rel err':>9}"
    print("\n" + header + "".join(f" {'x vs ' + p.split()[1]:>15}" for p in pyh))
    error = {name: abs(value - reference) / abs(reference) for name, (value, _) in results.items()}
    for name, (value, n_hvp) in results.items():
        ratios = "".join(f" {median[p] / median[name]:>15.2f}" for p in pyh)
        print(
            f"{name:<28} {n_hvp:>5} {median[name]:>8.1f} {median[name] / n_hvp:>6.2f} {value:>12.6f} {error[name]:>9.1e}{ratios}"
        )

    accurate = [p for p in pyh if error[p] <= ACCURACY_GOAL]
    if not accurate:
        print(f"\nno PyHessian tolerance reached {ACCURACY_GOAL:g} relative accuracy; pass a smaller one in --pyhessian-tols")
        return
    baseline = min(accurate, key=median.__getitem__)
    print(f"\nPyHessian at {ACCURACY_GOAL:g} accuracy: {baseline} ({median[baseline]:.1f} s)")
    for name in (n for n in results if n.startswith("ours lanczos")):
        speedup = median[baseline] / median[name]
        ok = speedup >= SPEEDUP_GOAL and error[name] <= ACCURACY_GOAL
        print(
            f"  {name}: {speedup:.2f}x faster, rel err {error[name]:.1e} -> goal {SPEEDUP_GOAL:g}x {'met' if ok else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
