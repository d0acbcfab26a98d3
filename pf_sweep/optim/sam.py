"""The SAM family as one optimizer wrapper: SAM, GSAM, ASAM and RandSAM, with m-sharpness.

The class keeps state and buffers; the math of each step (docs/sam.md) lives in the small functions
below (``normalize_ascent_``, ``gsam_decompose_``) so tests can check them directly.

Every working buffer is one contiguous tensor with a view per parameter (``FlatBuffer``): ``foreach``
kernels touch the views, and whole-model reductions (the global norm, the GSAM dot product, the
data-parallel all-reduce) run as single kernels on the flat tensor. Nothing in ``backward`` reads a
value back to the host, so on a GPU the step never stalls the stream.

Mixed precision: run the forward passes under ``torch.autocast`` (bf16) as usual. Parameters,
gradients, the backup, the perturbation and every SAM buffer keep the parameters' dtype (fp32 in the
usual autocast setup), so the restore is bit-exact and the norms are computed in full precision; the
losses and statistics returned are computed in fp32 from the (possibly bf16) logits.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pf_sweep.forgetting import forgetting_stats
from pf_sweep.optim.rho import ConstantRho, RhoSchedule, rho_schedule_from_dict

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

STAT_KEYS = (
    "loss",
    "clean_loss",
    "perturb_loss",
    "clean_top1",
    "flip_rate",
    "loss_increase",
    "kl",
    "target_prob_drop",
)


class FlatBuffer:
    """One contiguous tensor shaped like a list of parameters, with a view per parameter."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        first = params[0]
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def normalize_ascent_(
    g: torch.Tensor,
    abs_w: torch.Tensor | None,
    *,
    before_norm: bool,
    after_norm: bool,
    eps: float,
    gsam_h: torch.Tensor | None = None,
    backup_normalized: bool = False,
) -> torch.Tensor:
    """Turn the flat ascent gradient ``g`` into the perturbation direction d, in place (SAM step 2).

    g <- |w| * g if ``before_norm``;  d = g / (||g|| + eps);  d <- |w| * d if ``after_norm``.
    When ``gsam_h`` is given it receives GSAM's h: g as it stood before normalising (after the
    before-norm scaling), or the final d when ``backup_normalized``.
    """
    if before_norm:
        g.mul_(abs_w)
    if gsam_h is not None and not backup_normalized:
        gsam_h.copy_(g)
    g.div_(torch.linalg.vector_norm(g) + eps)
    if after_norm:
        g.mul_(abs_w)
    if gsam_h is not None and backup_normalized:
        gsam_h.copy_(g)
    return g


def gsam_decompose_(descent: torch.Tensor, h: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """GSAM (SAM step 4), in place on the flat perturbed gradient g':

    g' <- g' - alpha * (h - <h, u> u),  u = g' / (||g'|| + eps).

    Written as g' * (1 + alpha <h, g'> / (||g'|| + eps)^2) - alpha * h: two kernels, no host sync.
    """
    norm = torch.linalg.vector_norm(descent) + eps
    coef = 1.0 + alpha * torch.dot(h, descent) / (norm * norm)
    return descent.mul_(coef).sub_(h, alpha=alpha)


@contextlib.contextmanager
def frozen_running_stats(layers: Sequence[_BatchNorm]) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave running statistics untouched.

    Turning ``track_running_stats`` off (in train mode) does exactly that, and unlike ``momentum=0``
    it also leaves ``num_batches_tracked`` alone, so the running statistics see each sub-batch once.
    """
    saved = [layer.track_running_stats for layer in layers]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, saved, strict=True):
            layer.track_running_stats = flag


def _copy_grads_(dst_views: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """dst <- grads, with a missing gradient (unused parameter) read as zero."""
    if all(g is not None for g in grads):
        torch._foreach_copy_(list(dst_views), list(grads))
        return
    for view, grad in zip(dst_views, grads, strict=True):
        if grad is None:
            view.zero_()
        else:
            view.copy_(grad)


def _writable_in_place(tensors: Sequence[torch.Tensor | None]) -> bool:
    """True when each tensor owns its memory: contiguous and no storage shared with another.

    Autograd usually returns fresh tensors, but may hand out a view of another gradient (timm's
    ViT: ``cls_token``'s inside ``pos_embed``'s at batch 1) or an expanded one; scaling those in
    place would scale shared elements twice or fail.
    """
    storages = set()
    for t in tensors:
        if t is None:
            continue
        if not t.is_contiguous() or t.storage_offset() != 0:
            return False
        storages.add(t.untyped_storage().data_ptr())
    return len(storages) == sum(t is not None for t in tensors)


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    if dist.is_available() and dist.is_initialized() and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware wrapper around any ``torch.optim.Optimizer``.

    One class covers SAM (defaults), GSAM (``gsam_alpha > 0``), ASAM (``asam_before_norm`` and/or
    ``asam_after_norm``) and, through ``perturb_fn``, any perturbation objective such as OBF. For each
    sub-batch S of size m (``sharpness_m``):

    1. clean pass z = f(x_S; w); ascent gradient g = \nabla_w P(z, y); BatchNorm running stats update;
    2. d = g / (||g|| + eps) with the optional ASAM scalings by |w|; e = rho * d; w <- w + e;
    3. perturbed pass with running stats frozen; g' = \nabla_w L(f(x_S; w + e), y);
    4. GSAM: g' <- g' - alpha (h - <h, u> u), u = g'/||g'||;
    5. w <- backup (bit-exact copy, never w - e).

    ``.grad`` receives the mean of g' over sub-batches divided by ``accum_steps`` (added to what is
    already there, so several ``backward`` calls accumulate), then, when ``sync`` and a process group
    with more than one rank is initialised, one all-reduce averages it across workers. Both passes
    run under the model's ``no_sync`` when it has one (DDP).

    Hyperparameters are attributes rather than ``param_groups`` entries because they are global to
    the model (one perturbation over all parameters); ``state_dict`` carries them with the base
    optimizer's state.
    """

    needs_ascent_gradient = True

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        *,
        rho_schedule: RhoSchedule | None = None,
        gsam_alpha: float = 0.0,
        asam_before_norm: bool = False,
        asam_after_norm: bool = False,
        backup_normalized: bool = False,
        eps: float = 1e-12,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(f"Invalid base optimizer: {type(base_optimizer).__name__} (need a torch.optim.Optimizer)")
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"Invalid rho: {rho} (must be finite and >= 0)")
        if not (math.isfinite(gsam_alpha) and gsam_alpha >= 0):
            raise ValueError(f"Invalid gsam_alpha: {gsam_alpha} (must be finite and >= 0)")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        self.base_optimizer = base_optimizer
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        # Share, not copy: lr schedulers that edit our param_groups must edit the base optimizer's.
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.rho_schedule: RhoSchedule = rho_schedule if rho_schedule is not None else ConstantRho(rho)
        self.gsam_alpha = float(gsam_alpha)
        self.asam_before_norm = bool(asam_before_norm)
        self.asam_after_norm = bool(asam_after_norm)
        self.backup_normalized = bool(backup_normalized)
        self.eps = float(eps)
        self._params: list[torch.Tensor] | None = None
        self._bufs: dict[str, FlatBuffer] = {}
        self._norm_cache: tuple[weakref.ref, list[_BatchNorm]] | None = None

    # ----------------------------------------------------------------------------- bookkeeping
    @property
    def rho(self) -> float:
        """rho for the current learning rate (of the first param group)."""
        return self.rho_schedule(self.param_groups[0]["lr"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._params = None  # buffers follow the new parameter list

    def _trainable(self) -> list[torch.Tensor]:
        if self._params is None:
            params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
            if not params:
                raise ValueError("SAM has no trainable parameters (all have requires_grad=False)")
            kinds = {(p.device, p.dtype) for p in params}
            if len(kinds) > 1:
                raise ValueError(f"SAM needs all trainable parameters on one device and dtype, got {sorted(map(str, kinds))}")
            self._params = params
            self._bufs = {}
        return self._params

    def _buf(self, name: str) -> FlatBuffer:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = FlatBuffer(self._trainable())
        return buf

    def _running_stat_layers(self, model: nn.Module) -> list[_BatchNorm]:
        if self._norm_cache is None or self._norm_cache[0]() is not model:
            layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
            self._norm_cache = (weakref.ref(model), layers)
        return self._norm_cache[1]

    # ----------------------------------------------------------------------------- the step
    def _ascent_gradients(self, objective: torch.Tensor, params: list[torch.Tensor]) -> Sequence[torch.Tensor | None]:
        """Gradient of the perturbation objective at w, one tensor per parameter (RandSAM overrides this)."""
        return torch.autograd.grad(objective, params, allow_unused=True)

    def _perturb_(self, params: list[torch.Tensor], ascent: Sequence[torch.Tensor | None], rho: float) -> None:
        """Step 2 of docs/sam.md on the ascent gradients ``ascent`` (consumed in place): w <- w + e.

        Plain SAM normalises the gradients where autograd left them (a norm per tensor, then one scale
        and one add over all of them), unless two of them share memory (autograd may return one
        gradient as a view of another, or an expanded one). ASAM and GSAM need elementwise |w| and a
        saved h, which are single kernels on the flat ``direction`` buffer, so the gradients are
        gathered there first.
        """
        existing = self._bufs.get("direction")
        flat = existing is not None and ascent is existing.views
        plain = not (flat or self.asam_before_norm or self.asam_after_norm or self.gsam_alpha > 0)
        if plain and _writable_in_place(ascent):
            pairs = [(p, g) for p, g in zip(params, ascent, strict=True) if g is not None]
            if pairs:
                ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
                torch._foreach_mul_(gs, rho / (norm + self.eps))
                torch._foreach_add_(ps, gs)
            return
        direction = self._buf("direction")
        if not flat:
            _copy_grads_(direction.views, ascent)
        abs_w = None
        if self.asam_before_norm or self.asam_after_norm:
            abs_w = torch.abs(self._buf("backup").flat, out=self._buf("abs_w").flat)
        normalize_ascent_(
            direction.flat,
            abs_w,
            before_norm=self.asam_before_norm,
            after_norm=self.asam_after_norm,
            eps=self.eps,
            gsam_h=self._buf("gsam_h").flat if self.gsam_alpha > 0 else None,
            backup_normalized=self.backup_normalized,
        )
        torch._foreach_add_(params, direction.views, alpha=rho)

    def _descent_gradient(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Step 4: GSAM's decomposition when alpha > 0; the perturbed gradient unchanged otherwise."""
        if self.gsam_alpha <= 0:
            return list(grads)
        descent = self._buf("descent")
        _copy_grads_(descent.views, grads)
        gsam_decompose_(descent.flat, self._buf("gsam_h").flat, self.gsam_alpha, self.eps)
        return [None if g is None else v for g, v in zip(grads, descent.views, strict=True)]

    @staticmethod
    def _accumulate_(params: list[torch.Tensor], grads: Sequence[torch.Tensor | None], scale: float, owned: bool) -> None:
        """p.grad += scale * g; a parameter with no gradient in this pass keeps what it had."""
        existing, new = [], []
        fresh_params, fresh = [], []
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            if p.grad is None:
                fresh_params.append(p)
                fresh.append(g)
            else:
                existing.append(p.grad)
                new.append(g)
        if existing:
            torch._foreach_add_(existing, new, alpha=scale)
        if fresh:
            if owned:  # autograd's outputs belong to nobody else: scale them in place, no new copy
                if scale != 1.0:
                    torch._foreach_mul_(fresh, scale)
            else:
                fresh = torch._foreach_mul(fresh, scale)
            for p, g in zip(fresh_params, fresh, strict=True):
                p.grad = g

    def _all_reduce_grads_(self, params: list[torch.Tensor]) -> None:
        """Average ``.grad`` across data-parallel ranks with one collective on a flat buffer.

        gloo has no AVG reduction, so it is SUM then divide. A rank with no gradient for a parameter
        contributes zeros; parameters with no gradient here stay without one.
        """
        world = dist.get_world_size()
        if world == 1:
            return
        flat = self._buf("direction")  # free between steps: reuse it as the bucket
        grads = [p.grad for p in params]
        _copy_grads_(flat.views, grads)
        dist.all_reduce(flat.flat)
        flat.flat.div_(world)
        present = [g for g in grads if g is not None]
        views = [v for g, v in zip(grads, flat.views, strict=True) if g is not None]
        torch._foreach_copy_(present, views)

    @torch.no_grad()
    def backward(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn,
        perturb_fn: LossFn | None = None,
        sharpness_m: int | None = None,
        accum_steps: int = 1,
        sync: bool = True,
        per_example: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Compute the SAM update gradient into ``.grad`` (see the class docstring for the math).

        ``loss_fn(logits, targets)`` is the training loss L; ``perturb_fn`` the perturbation
        objective P (None: P = L, the standard "max" perturbation). Returns 0-d tensors averaged over
        sub-batches: ``loss`` (L at w + e), ``clean_loss`` (L at w), ``perturb_loss`` (P at w),
        ``clean_top1`` and the forgetting statistics of ``pf_sweep.forgetting``. With ``per_example``
        also ``correct`` and ``correct_perturbed``: boolean tensors over the whole batch (argmax ==
        target at w and at w + e), which the statistics compute anyway (the example recorder's input).
        """
        batch = inputs.shape[0]
        if targets.shape[0] != batch:
            raise ValueError(f"inputs and targets disagree on the batch size: {batch} vs {targets.shape[0]}")
        m = batch if sharpness_m is None else sharpness_m
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m <= 0 or batch % m != 0:
            raise ValueError(f"Invalid sharpness_m: {sharpness_m} (must be a positive divisor of the batch size {batch})")
        m = int(m)
        if accum_steps < 1:
            raise ValueError(f"Invalid accum_steps: {accum_steps} (must be >= 1)")
        params = self._trainable()
        backup = self._buf("backup")
        layers = self._running_stat_layers(model)
        rho = self.rho
        n_sub = batch // m
        scale = 1.0 / (n_sub * accum_steps)
        sums: dict[str, torch.Tensor] = {}
        hits: dict[str, list[torch.Tensor]] = {"correct": [], "correct_perturbed": []} if per_example else {}

        with _no_sync(model):
            torch._foreach_copy_(backup.views, params)  # restores are exact copies: one backup serves all sub-batches
            for start in range(0, batch, m):
                x, y = inputs[start : start + m], targets[start : start + m]

                with torch.set_grad_enabled(self.needs_ascent_gradient):
                    logits = model(x)
                    clean_loss = loss_fn(logits, y)
                    objective = clean_loss if perturb_fn is None else perturb_fn(logits, y)
                self._perturb_(params, self._ascent_gradients(objective, params), rho)

                with frozen_running_stats(layers), torch.enable_grad():
                    perturbed_logits = model(x)
                    loss = loss_fn(perturbed_logits, y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                torch._foreach_copy_(params, backup.views)
                owned = self.gsam_alpha <= 0 and _writable_in_place(grads)
                self._accumulate_(params, self._descent_gradient(grads), scale, owned=owned)

                stats = forgetting_stats(logits, perturbed_logits, y, clean_loss, loss, per_example=per_example)
                for key, found in hits.items():
                    found.append(stats.pop(key))
                stats["loss"] = loss.detach().float()
                stats["clean_loss"] = clean_loss.detach().float()
                stats["perturb_loss"] = objective.detach().float()
                stats["clean_top1"] = (logits.detach().argmax(dim=-1) == y).float().mean()
                for key, value in stats.items():
                    sums[key] = value if key not in sums else sums[key] + value

        if sync and dist.is_available() and dist.is_initialized():
            self._all_reduce_grads_(params)
        return {key: sums[key] / n_sub for key in STAT_KEYS} | {key: torch.cat(found) for key, found in hits.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, model: nn.Module | None = None):
        """Without a closure: the base optimizer's step on the gradients ``backward`` computed.

        With a closure (the drop-in form of the common SAM ports): ``closure()`` must zero nothing,
        run forward + ``loss.backward()`` and return the loss. It is called at w and at w + e, the
        whole batch is one sub-batch (m = batch), and the base step follows. Pass ``model`` to keep
        BatchNorm running stats out of the perturbed pass. Returns the clean loss.
        """
        if closure is None:
            return self.base_optimizer.step()
        params = self._trainable()
        backup = self._buf("backup")
        layers = self._running_stat_layers(model) if model is not None else []

        self.zero_grad(set_to_none=True)
        torch._foreach_copy_(backup.views, params)
        with torch.enable_grad():
            clean_loss = closure()
        ascent = [p.grad for p in params] if self.needs_ascent_gradient else self._ascent_gradients(clean_loss, params)
        self._perturb_(params, ascent, self.rho)

        self.zero_grad(set_to_none=True)
        with frozen_running_stats(layers), torch.enable_grad():
            closure()
        torch._foreach_copy_(params, backup.views)
        grads = [p.grad for p in params]
        descent = self._descent_gradient(grads)
        if self.gsam_alpha > 0:
            torch._foreach_copy_([g for g in grads if g is not None], [d for d in descent if d is not None])
        self.base_optimizer.step()
        return clean_loss

    # ----------------------------------------------------------------------------- state
    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "rho_schedule": self.rho_schedule.to_dict(),
            "gsam_alpha": self.gsam_alpha,
            "asam_before_norm": self.asam_before_norm,
            "asam_after_norm": self.asam_after_norm,
            "backup_normalized": self.backup_normalized,
            "eps": self.eps,
        }

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state plus SAM's hyperparameters (plain containers: weights_only-safe)."""
        return {"base": self.base_optimizer.state_dict(), "sam": self._hyperparameters()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"base", "sam"}:
            raise ValueError(f"Not a SAM state_dict: keys {sorted(state_dict)} (expected ['base', 'sam'])")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        sam = dict(state_dict["sam"])
        self.rho_schedule = rho_schedule_from_dict(sam.pop("rho_schedule"))
        self._load_extra(sam)
        for key in ("gsam_alpha", "asam_before_norm", "asam_after_norm", "backup_normalized", "eps"):
            setattr(self, key, sam[key])
        self._params = None

    def _load_extra(self, sam_state: dict[str, Any]) -> None:
        """Hook for subclasses with state of their own."""


class RandSAM(SAM):
    """SAM with a Gaussian ascent direction instead of the gradient: g ~ N(0, I).

    The noise comes from a generator of its own (seeded from ``seed`` or, when None, from the global
    torch RNG at construction) whose state travels in ``state_dict``, so a resumed run draws the same
    perturbations. The clean pass still runs, for BatchNorm statistics and the forgetting metrics,
    but without building a graph.
    """

    needs_ascent_gradient = False

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, *, seed: int | None = None, **kwargs):
        super().__init__(base_optimizer, rho, **kwargs)
        device = self._trainable()[0].device
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def _ascent_gradients(self, objective: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        direction = self._buf("direction")
        direction.flat.normal_(generator=self.generator)
        return direction.views

    def _hyperparameters(self) -> dict[str, Any]:
        return {**super()._hyperparameters(), "rng_state": self.generator.get_state()}

    def _load_extra(self, sam_state: dict[str, Any]) -> None:
        self.generator.set_state(sam_state.pop("rng_state"))
