"""Base optimizer (timm) + SAM wrapper + lr schedule (timm), all from a ``TrialConfig``."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from pf_sweep.config import TrialConfig
from pf_sweep.optim.rho import ConstantRho, LrProportionalRho, RhoSchedule
from pf_sweep.optim.sam import SAM, RandSAM

# timm's names, except "linear": linear decay per step, which timm spells poly with power 1.
_TIMM_SCHED = {"cosine": "cosine", "linear": "poly", "constant": "const", "step": "step"}


def build_rho_schedule(cfg: TrialConfig) -> RhoSchedule:
    if cfg.rho_policy == "lr_prop":
        return LrProportionalRho(rho_max=cfg.rho, rho_min=cfg.min_rho, lr_max=cfg.resolved_lr, lr_min=cfg.min_lr)
    return ConstantRho(cfg.rho)


def build_optimizer(model: nn.Module, cfg: TrialConfig, rank: int = 0) -> torch.optim.Optimizer:
    """timm's optimizer (no weight decay on biases and norm layers), wrapped in SAM unless method='sgd'."""
    kwargs = {"momentum": cfg.momentum} if cfg.opt in ("sgd", "sgdw", "momentum") else {}
    if cfg.nesterov is not None:
        kwargs["nesterov"] = cfg.nesterov
    base = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay, filter_bias_and_bn=True, **kwargs
    )
    if not cfg.uses_sam:
        return base
    sam_kwargs = {
        "rho_schedule": build_rho_schedule(cfg),
        "gsam_alpha": cfg.gsam_alpha,
        "asam_before_norm": cfg.asam_before_norm,
        "asam_after_norm": cfg.asam_after_norm,
        "backup_normalized": cfg.backup_normalized,
    }
    if cfg.method == "randsam":
        return RandSAM(base, cfg.rho, seed=cfg.seed * 1000 + rank, **sam_kwargs)
    return SAM(base, cfg.rho, **sam_kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, updates_per_epoch: int) -> Scheduler:
    """A timm scheduler stepped per update (``step_update``) after a linear warmup.

    ``linear`` decays from the end of the warmup to ``min_lr`` at the last update (timm's poly with
    power 1, the warmup a prefix), as the paper's release schedules it; the other schedules count
    their decay from the first update, as timm does by default.
    """
    extra = {"decay_rate": 1.0} if cfg.sched == "linear" else {}
    num_epochs = cfg.epochs
    if cfg.sched == "linear" and cfg.warmup_epochs:
        extra["warmup_prefix"] = True
        num_epochs = cfg.epochs - cfg.warmup_epochs
    if cfg.sched == "step":
        extra = {"decay_epochs": max(1, cfg.epochs // 3), "decay_rate": 0.1}
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=_TIMM_SCHED[cfg.sched],
        num_epochs=num_epochs,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        **extra,
    )
    return scheduler
