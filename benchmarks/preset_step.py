"""Time one training micro-batch of a paper preset's run and estimate what the whole run costs.

Builds the run exactly as a sweep would (``search_spaces.get(preset)``, its global batch split for
``--workers``), on this machine's device: the real timm model, the run's optimizer (SAM-family
wrapper included), loss and perturbation. It times ``--steps`` micro-batches after ``--warmup``
untimed ones and prints the median, examples per second, the peak GPU memory (CUDA only), and an
estimate of one ImageNet epoch (1,281,167 images) and of the run's ``epochs`` on ``--workers``
devices, assuming they scale linearly (data loading not included).

    .venv/bin/python benchmarks/preset_step.py paper_rn50 sam_obf                   # the real 224 px, per-worker batch
    .venv/bin/python benchmarks/preset_step.py paper_vits32 sam_max --batch 16 --img-size 64   # a CPU-sized probe
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import search_spaces
from pf_sweep.config import TrialConfig
from pf_sweep.data.registry import DatasetInfo
from pf_sweep.losses import build_loss, build_perturbation
from pf_sweep.models import build_model
from pf_sweep.optim import SAM
from pf_sweep.optim.build import build_optimizer
from pf_sweep.sweep import SweepSettings, run_config

IMAGENET_TRAIN = 1_281_167


def resolved(preset: str, run: str, workers: int, overrides: dict) -> TrialConfig:
    settings = SweepSettings(num_samples=1, max_concurrent=1, workers_per_trial=workers, overrides=overrides)
    return run_config(search_spaces.get(preset).with_runs([run]), run, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("run")
    parser.add_argument("--workers", type=int, default=1, help="devices the global batch is split over")
    parser.add_argument("--batch", type=int, help="micro-batch (default: the preset's per-worker batch)")
    parser.add_argument("--img-size", type=int, help="default: the preset's (224)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    overrides = {k: v for k, v in {"batch_size": args.batch, "img_size": args.img_size}.items() if v is not None}
    m = search_spaces.get(args.preset).points[args.run].get("sharpness_m")
    if args.batch and m and args.batch % m:  # a probe smaller than m perturbs the whole micro-batch at once
        overrides["sharpness_m"] = args.batch
    cfg = resolved(args.preset, args.run, args.workers, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # the release trains in FP32 with TF32 matmuls
    info = DatasetInfo(
        name="imagenet", num_classes=1000, in_chans=3, image_size=cfg.img_size or 224, mean=(0.5,) * 3, std=(0.5,) * 3, splits=()
    )
    model = build_model(cfg, info).to(device).train()
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss, smoothing=cfg.smoothing, bce_reduction=cfg.bce_reduction).to(device)
    perturb_fn = build_perturbation(cfg.perturbation, obf_C=cfg.obf_C, obf_gamma=cfg.obf_gamma, obf_sigmoid=cfg.obf_sigmoid)
    side = cfg.img_size or 224
    x = torch.randn(cfg.batch_size, 3, side, side, device=device)
    y = torch.randint(0, 1000, (cfg.batch_size,), device=device)

    def micro_batch() -> None:
        if isinstance(optimizer, SAM):
            optimizer.backward(model, x, y, loss_fn, perturb_fn, cfg.sharpness_m)
        else:
            loss_fn(model(x), y).backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        micro_batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    per_second = cfg.batch_size / median
    epoch_h = IMAGENET_TRAIN / (per_second * args.workers) / 3600
    print(f"{args.preset} {args.run} on {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")
    print(
        f"model {cfg.model} at {side} px, method {cfg.method}, per-worker batch {cfg.batch_size} x {cfg.grad_accum_steps} "
        f"accumulation x {args.workers} workers = {cfg.global_batch_size}"
    )
    print(f"micro-batch median {median * 1000:.1f} ms over {args.steps} (min {min(times) * 1000:.1f}), {per_second:.1f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    total = epoch_h * cfg.epochs
    print(f"estimate: {epoch_h:.2f} h per ImageNet epoch on {args.workers} device(s), {total:.1f} h for {cfg.epochs} epochs")


if __name__ == "__main__":
    main()
