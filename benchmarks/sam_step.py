"""Cost of one SAM-family training step against plain SGD, on CPU.

For each model (timm ``resnet18`` and a small ViT, 32x32 inputs, 10 classes) this times, in one run
and interleaved round-robin so that machine noise hits every row alike, the median wall time of:

- SGD: one forward + backward + ``torch.optim.SGD(momentum=0.9)`` step (the baseline);
- ``pf_sweep.optim.SAM`` with m = batch and m = batch/4, GSAM (alpha 0.05), ASAM (before-norm and
  after-norm scaling), and OBF (``pf_sweep.losses.OBF(C=1000)`` as the perturbation objective), each
  as ``SAM.backward(model, x, y, loss_fn, perturb_fn, sharpness_m)`` then ``.step()`` and ``.zero_grad()``;
- naive SAM: the common per-parameter-loop port ("davda54" style), written here as the reference.

Goals, checked per model at the end: SAM with m = batch costs at most 2.05x an SGD step (two forward
+ backward passes make 2x the floor), and is never slower than the naive loop.

    .venv/bin/python benchmarks/sam_step.py            # default run, a few minutes on 2 cores
    .venv/bin/python benchmarks/sam_step.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pf_sweep.losses import OBF, CrossEntropy
from pf_sweep.optim import SAM

StepFn = Callable[[torch.Tensor, torch.Tensor], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NUM_CLASSES = 10
IMAGE_SIZE = 32
LR = 0.01
RHO = 0.05
SAM_RATIO_GOAL = 2.05

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: timm.create_model("resnet18", num_classes=NUM_CLASSES),
    # vit_tiny (12 blocks, width 192, 3 heads) on 32x32 inputs; 8x8 patches (16 tokens) keep the default run short.
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=IMAGE_SIZE, patch_size=8),
}


# --------------------------------------------------------------------------------------- steps
def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def sgd_step(model: nn.Module, loss_fn: LossFn) -> StepFn:
    opt = sgd(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step


def sam_step(model: nn.Module, loss_fn: LossFn, *, perturb_fn: LossFn | None = None, m: int | None = None, **kw) -> StepFn:
    opt = SAM(sgd(model), rho=RHO, **kw)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.backward(model, x, y, loss_fn, perturb_fn, sharpness_m=m)
        opt.step()
        opt.zero_grad()

    return step


class NaiveSAM:
    """The usual per-parameter SAM port: Python loops, a clone per tensor, ``.backward()`` twice."""

    def __init__(self, model: nn.Module, rho: float = RHO) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base = sgd(model)
        self.rho = rho
        self.backup: dict[nn.Parameter, torch.Tensor] = {}
        self.bn = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self.bn_momentum = [m.momentum for m in self.bn]

    @torch.no_grad()
    def first_step(self) -> None:
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.backup[p] = p.clone()
            p.add_(p.grad * scale)
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self) -> None:
        for p in self.params:
            if p in self.backup:
                p.copy_(self.backup[p])
        self.base.step()
        self.base.zero_grad()

    def freeze_bn(self, frozen: bool) -> None:
        for layer, momentum in zip(self.bn, self.bn_momentum, strict=True):
            layer.momentum = 0.0 if frozen else momentum


def naive_sam_step(model: nn.Module, loss_fn: LossFn) -> StepFn:
    opt = NaiveSAM(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(model(x), y).backward()
        opt.first_step()
        opt.freeze_bn(True)
        loss_fn(model(x), y).backward()
        opt.freeze_bn(False)
        opt.second_step()

    return step


def build_rows(batch: int) -> dict[str, Callable[[nn.Module, LossFn], StepFn]]:
    """Row label -> factory of a step function on a fresh copy of the model."""
    return {
        "SGD": sgd_step,
        "SAM m=batch": sam_step,
        f"SAM m={batch // 4}": lambda mdl, lf: sam_step(mdl, lf, m=batch // 4),
        "GSAM a=0.05": lambda mdl, lf: sam_step(mdl, lf, gsam_alpha=0.05),
        "ASAM before": lambda mdl, lf: sam_step(mdl, lf, asam_before_norm=True),
        "ASAM after": lambda mdl, lf: sam_step(mdl, lf, asam_after_norm=True),
        "OBF C=1000": lambda mdl, lf: sam_step(mdl, lf, perturb_fn=OBF(C=1000)),
        "naive SAM loop": naive_sam_step,
    }


# --------------------------------------------------------------------------------------- timing
def timed(step: StepFn, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    step(x, y)
    return (time.perf_counter() - start) * 1e3


def measure_model(name: str, batch: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """ms per step of every row on ``name``; repeats interleave the rows (round-robin)."""
    torch.manual_seed(0)
    base = MODELS[name]().train()
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    loss_fn = CrossEntropy()
    steps = {label: make(copy.deepcopy(base), loss_fn) for label, make in build_rows(batch).items()}
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(timed(step, x, y))
    return times


# --------------------------------------------------------------------------------------- report
def print_table(name: str, times: dict[str, list[float]]) -> dict[str, float]:
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    sgd_ms = medians["SGD"]
    print(f"\n{name}")
    print(f"  {'step':<16} {'median ms':>10} {'x SGD':>7} {'min-max ms':>17}")
    for label, ts in times.items():
        spread = f"{min(ts):.0f}-{max(ts):.0f}"
        print(f"  {label:<16} {medians[label]:>10.1f} {medians[label] / sgd_ms:>7.2f} {spread:>17}")
    return medians


def goal_lines(name: str, medians: dict[str, float]) -> list[str]:
    ratio = medians["SAM m=batch"] / medians["SGD"]
    vs_naive = medians["SAM m=batch"] / medians["naive SAM loop"]
    return [
        f"{'PASS' if ratio <= SAM_RATIO_GOAL else 'MISS'}  {name}: SAM m=batch is {ratio:.3f}x SGD (goal <= {SAM_RATIO_GOAL}x)",
        f"{'PASS' if vs_naive <= 1.0 else 'MISS'}  {name}: SAM m=batch is {vs_naive:.3f}x the naive loop (goal <= 1.00x)",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per row; the median is reported (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (default 2)")
    parser.add_argument("--batch", type=int, default=128, help="batch size, a multiple of 4 (default 128)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list from {', '.join(MODELS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 warmup, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.batch <= 0 or args.batch % 4:
        parser.error(f"--batch must be a positive multiple of 4, got {args.batch}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"SAM step benchmark: torch {torch.__version__}, timm {timm.__version__}, CPU, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, {IMAGE_SIZE}x{IMAGE_SIZE}, median of {args.repeats} (after {args.warmup} warmup)"
    )
    start = time.perf_counter()
    goals: list[str] = []
    for name in args.models:
        medians = print_table(name, measure_model(name, args.batch, args.repeats, args.warmup))
        goals += goal_lines(name, medians)
    print()
    print("\n".join(goals))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
