"""The SAM family optimizer (pf_sweep.optim.sam) against a naive SAM written out in this file.

``naive_sam_grads`` is the reference: the steps of docs/sam.md ("One step"), per parameter, with
plain Python loops and ``torch.autograd.grad``; BatchNorm running statistics are frozen in the
perturbed pass by saving and restoring the buffers (not the way the optimizer does it). Models are
float64 so that the optimizer and the reference agree to far better than the 1e-6 asserted.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pf_sweep.losses import OBF
from pf_sweep.optim import SAM, LrProportionalRho, RandSAM
from pf_sweep.optim.sam import gsam_decompose_, normalize_ascent_

NUM_CLASSES = 5
BATCH = 12
TOL = {"rtol": 1e-6, "atol": 1e-6}

# ----------------------------------------------------------------------------------------- fixtures


def make_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))
    elif kind == "cnn_bn":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, padding=1, stride=2),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, NUM_CLASSES),
        )
    else:
        raise AssertionError(kind)
    return model.to(dtype).train()


def make_batch(kind: str, n: int = BATCH, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 2, 6, 6)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y


MODELS = ["mlp", "cnn_bn"]


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in trainable(model)]


def assert_grads_close(actual, expected, **tol) -> None:
    tol = tol or TOL
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if e is None:
            assert a is None, f"parameter {i}: expected no gradient"
        else:
            assert a is not None, f"parameter {i}: gradient missing"
            torch.testing.assert_close(a, e, **tol, msg=lambda m, i=i: f"parameter {i}: {m}")


# ----------------------------------------------------------------------------------------- the reference


def global_norm(tensors) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def dot(a, b) -> float:
    return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))


def naive_obf(C: float, gamma: float, sigmoid: bool):
    """OBF objective written from the formula in docs/sam.md, in float64."""

    def objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, k = logits.shape
        with torch.no_grad():
            z = logits.double()
            p = torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=1)
            lam = 0.0 if C < 0 else 1.0 / C
            p_y = p[torch.arange(n), y]
            alpha = gamma * torch.clamp((1.0 - lam / p_y) / (1.0 - lam), min=0.0)
            onehot = torch.zeros_like(p)
            onehot[torch.arange(n), y] = 1.0
            weight = 1.0 / k - alpha[:, None] * p - (1.0 - alpha[:, None]) * onehot
        return (weight * logits).sum() / n

    return objective


def naive_sam_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rho: float,
    loss_fn=F.cross_entropy,
    perturb_fn=None,
    m: int | None = None,
    gsam_alpha: float = 0.0,
    backup_normalized: bool = False,
    before_norm: bool = False,
    after_norm: bool = False,
    perturbations: list[list[torch.Tensor]] | None = None,
    record: dict | None = None,
) -> list[torch.Tensor | None]:
    """Mean over sub-batches of the SAM descent gradient, computed the slow, obvious way.

    ``perturbations``: the e to use for each sub-batch instead of the gradient-derived one (RandSAM).
    ``record``: receives per-sub-batch clean/perturbed logits and losses.
    Runs ``model`` in place: clean passes update BatchNorm running stats, perturbed passes do not.
    """
    params = trainable(model)
    m = len(x) if m is None else m
    n_sub = len(x) // m
    total: list[torch.Tensor | None] = [None] * len(params)
    for k in range(n_sub):
        xs, ys = x[k * m : (k + 1) * m], y[k * m : (k + 1) * m]
        w = [p.detach().clone() for p in params]

        # 1. clean pass and ascent gradient
        logits = model(xs)
        clean_loss = loss_fn(logits, ys)
        objective = clean_loss if perturb_fn is None else perturb_fn(logits, ys)
        g = list(torch.autograd.grad(objective, params, allow_unused=True))
        g = [torch.zeros_like(p) if gi is None else gi.detach() for gi, p in zip(g, params, strict=True)]

        # 2. direction and perturbation
        if perturbations is not None:
            e = perturbations[k]
            h = None
        else:
            if before_norm:
                g = [gi * wi.abs() for gi, wi in zip(g, w, strict=True)]
            norm = global_norm(g)
            d = [gi / norm for gi in g]
            if after_norm:
                d = [di * wi.abs() for di, wi in zip(d, w, strict=True)]
            h = d if backup_normalized else g
            e = [rho * di for di in d]
        with torch.no_grad():
            for p, wi, ei in zip(params, w, e, strict=True):
                p.copy_(wi + ei)

        # 3. perturbed pass; BatchNorm running stats put back afterwards
        saved = [b.detach().clone() for b in model.buffers()]
        perturbed_logits = model(xs)
        loss = loss_fn(perturbed_logits, ys)
        gp = list(torch.autograd.grad(loss, params, allow_unused=True))
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)

        # 5. restore
        with torch.no_grad():
            for p, wi in zip(params, w, strict=True):
                p.copy_(wi)

        # 4. GSAM
        if gsam_alpha > 0:
            dense = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(gp, params, strict=True)]
            gnorm = global_norm(dense)
            u = [gi / gnorm for gi in dense]
            hu = dot(h, u)
            gp = [None if gi is None else gi - gsam_alpha * (hi - hu * ui) for gi, hi, ui in zip(gp, h, u, strict=True)]

        for i, gi in enumerate(gp):
            if gi is not None:
                total[i] = gi / n_sub if total[i] is None else total[i] + gi / n_sub

        if record is not None:
            record.setdefault("clean_logits", []).append(logits.detach())
            record.setdefault("perturbed_logits", []).append(perturbed_logits.detach())
            record.setdefault("clean_loss", []).append(clean_loss.detach())
            record.setdefault("loss", []).append(loss.detach())
            record.setdefault("perturb_loss", []).append(objective.detach())
            record.setdefault("targets", []).append(ys)
    return total


class ParamRecorder:
    """A loss_fn that snapshots the trainable parameters each time it is called.

    In ``SAM.backward`` the calls alternate clean pass (params = w) / perturbed pass (params = w + e),
    so consecutive snapshots give the perturbation the optimizer applied.
    """

    def __init__(self, model: nn.Module, loss_fn=F.cross_entropy) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.snapshots: list[list[torch.Tensor]] = []

    def __call__(self, logits, y):
        self.snapshots.append([p.detach().clone() for p in trainable(self.model)])
        return self.loss_fn(logits, y)

    def perturbations(self) -> list[list[torch.Tensor]]:
        assert len(self.snapshots) % 2 == 0
        pairs = zip(self.snapshots[0::2], self.snapshots[1::2], strict=True)
        return [[b - a for a, b in zip(clean, pert, strict=True)] for clean, pert in pairs]


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


# ----------------------------------------------------------------------------------------- .grad vs reference

# name -> (SAM kwargs, reference kwargs, backward kwargs)
CASES = {
    "sam": ({"rho": 0.1}, {"rho": 0.1}, {}),
    "gsam": ({"rho": 0.1, "gsam_alpha": 0.4}, {"rho": 0.1, "gsam_alpha": 0.4}, {}),
    "gsam_backup_normalized": (
        {"rho": 0.1, "gsam_alpha": 0.4, "backup_normalized": True},
        {"rho": 0.1, "gsam_alpha": 0.4, "backup_normalized": True},
        {},
    ),
    "asam_before_norm": ({"rho": 0.5, "asam_before_norm": True}, {"rho": 0.5, "before_norm": True}, {}),
    "asam_after_norm": ({"rho": 0.5, "asam_after_norm": True}, {"rho": 0.5, "after_norm": True}, {}),
    "asam_before_and_after_norm": (
        {"rho": 0.5, "asam_before_norm": True, "asam_after_norm": True},
        {"rho": 0.5, "before_norm": True, "after_norm": True},
        {},
    ),
    "gsam_h_after_asam_before_norm": (
        {"rho": 0.5, "gsam_alpha": 0.4, "asam_before_norm": True},
        {"rho": 0.5, "gsam_alpha": 0.4, "before_norm": True},
        {},
    ),
    "gsam_backup_normalized_after_asam_after_norm": (
        {"rho": 0.5, "gsam_alpha": 0.4, "asam_after_norm": True, "backup_normalized": True},
        {"rho": 0.5, "gsam_alpha": 0.4, "after_norm": True, "backup_normalized": True},
        {},
    ),
    "obf_sigmoid": (
        {"rho": 0.1},
        {"rho": 0.1, "perturb_fn": naive_obf(1.5, 0.8, sigmoid=True)},
        {"perturb_fn": OBF(1.5, 0.8, sigmoid=True)},
    ),
    "obf_softmax_lambda_zero": (
        {"rho": 0.1},
        {"rho": 0.1, "perturb_fn": naive_obf(-1.0, 0.5, sigmoid=False)},
        {"perturb_fn": OBF(-1.0, 0.5, sigmoid=False)},
    ),
    "m_sharpness": ({"rho": 0.1}, {"rho": 0.1, "m": 4}, {"sharpness_m": 4}),
    "m_sharpness_one_example": ({"rho": 0.1}, {"rho": 0.1, "m": 1}, {"sharpness_m": 1}),
    "gsam_m_sharpness": (
        {"rho": 0.1, "gsam_alpha": 0.4},
        {"rho": 0.1, "gsam_alpha": 0.4, "m": 3},
        {"sharpness_m": 3},
    ),
    "obf_m_sharpness": (
        {"rho": 0.1},
        {"rho": 0.1, "m": 6, "perturb_fn": naive_obf(4.0, 1.0, sigmoid=True)},
        {"sharpness_m": 6, "perturb_fn": OBF(4.0, 1.0, sigmoid=True)},
    ),
    # lr = 0.1 (the sgd() default) -> rho = 0.02 + (0.2 - 0.02) * (0.1 - 0.0) / (0.5 - 0.0) = 0.056
    "lr_prop_rho": (
        {"rho_schedule": LrProportionalRho(rho_max=0.2, rho_min=0.02, lr_max=0.5, lr_min=0.0)},
        {"rho": 0.056},
        {},
    ),
}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_grad_matches_naive_reference(case, kind):
    sam_kwargs, ref_kwargs, backward_kwargs = CASES[case]
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch(kind)

    sam = SAM(sgd(model), **sam_kwargs)
    sam.backward(model, x, y, F.cross_entropy, **backward_kwargs)

    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, **ref_kwargs))


@pytest.mark.parametrize("kind", MODELS)
def test_sam_grad_differs_from_plain_gradient_so_the_comparisons_are_sensitive(kind):
    model = make_model(kind)
    x, y = make_batch(kind)
    twin = copy.deepcopy(model)
    plain = torch.autograd.grad(F.cross_entropy(twin(x), y), list(twin.parameters()))
    SAM(sgd(model), rho=0.1).backward(model, x, y, F.cross_entropy)
    assert global_norm([p.grad - g for p, g in zip(model.parameters(), plain, strict=True)]) > 1e-3


@pytest.mark.parametrize("kind", MODELS)
def test_rho_zero_gives_mean_of_plain_sub_batch_gradients(kind):
    model = make_model(kind)
    twin = copy.deepcopy(model)
    x, y = make_batch(kind)
    SAM(sgd(model), rho=0.0).backward(model, x, y, F.cross_entropy, sharpness_m=6)
    halves = [torch.autograd.grad(F.cross_entropy(twin(x[i : i + 6]), y[i : i + 6]), list(twin.parameters())) for i in (0, 6)]
    assert_grads_close(grads_of(model), [(a + b) / 2 for a, b in zip(*halves, strict=True)])


@pytest.mark.parametrize("kind", MODELS)
def test_parameters_split_over_param_groups_share_one_global_norm(kind):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch(kind)
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    base = torch.optim.SGD([{"params": others, "lr": 0.01}, {"params": weights}], lr=0.1)
    SAM(base, rho=0.2, gsam_alpha=0.3).backward(model, x, y, F.cross_entropy)
    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, rho=0.2, gsam_alpha=0.3))


def test_param_group_added_after_a_step_joins_the_perturbation():
    model = make_model("mlp")
    reference = copy.deepcopy(model)
    x, y = make_batch("mlp")
    sam = SAM(torch.optim.SGD(model[2:].parameters(), lr=0.1), rho=0.2)
    sam.backward(model, x, y, F.cross_entropy)  # buffers now sized for the last layers only
    sam.add_param_group({"params": list(model[0].parameters())})
    sam.zero_grad(set_to_none=True)
    sam.backward(model, x, y, F.cross_entropy)
    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, rho=0.2))


@pytest.mark.parametrize("kind", MODELS)
def test_accumulation_adds_mean_over_micro_batches_to_existing_grad(kind):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    sam = SAM(sgd(model), rho=0.1)
    existing = [torch.randn_like(p) for p in trainable(model)]
    for p, g in zip(trainable(model), existing, strict=True):
        p.grad = g.clone()
    micro_batches = [make_batch(kind, seed=s) for s in (11, 12, 13)]

    for x, y in micro_batches:
        sam.backward(model, x, y, F.cross_entropy, sharpness_m=4, accum_steps=3)

    expected = [g.clone() for g in existing]
    for x, y in micro_batches:
        for i, g in enumerate(naive_sam_grads(reference, x, y, rho=0.1, m=4)):
            expected[i] += g / 3
    assert_grads_close(grads_of(model), expected)


@pytest.mark.parametrize("kind", MODELS)
def test_backward_returns_sub_batch_means_of_losses_and_forgetting_stats(kind):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch(kind, n=24, seed=5)
    stats = SAM(sgd(model), rho=3.0).backward(model, x, y, F.cross_entropy, sharpness_m=8)

    rec: dict = {}
    naive_sam_grads(reference, x, y, rho=3.0, m=8, record=rec)
    expected = {key: [] for key in stats}
    for z, zp, yy, cl, pl in zip(
        rec["clean_logits"], rec["perturbed_logits"], rec["targets"], rec["clean_loss"], rec["loss"], strict=True
    ):
        p, q = torch.softmax(z, 1), torch.softmax(zp, 1)
        right, right_p = z.argmax(1) == yy, zp.argmax(1) == yy
        expected["loss"].append(float(pl))
        expected["clean_loss"].append(float(cl))
        expected["perturb_loss"].append(float(cl))
        expected["clean_top1"].append(float(right.double().mean()))
        expected["flip_rate"].append(float((right & ~right_p).double().mean()))
        expected["loss_increase"].append(float(pl - cl))
        expected["kl"].append(float((p * (p.log() - q.log())).sum(1).mean()))
        idx = torch.arange(len(yy))
        expected["target_prob_drop"].append(float((p[idx, yy] - q[idx, yy]).mean()))
    assert sum(expected["flip_rate"]) > 0  # the perturbation is big enough for flips to be checked
    assert set(stats) == set(expected)
    for key, values in expected.items():
        assert stats[key].dim() == 0
        assert float(stats[key]) == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-6), key


# ----------------------------------------------------------------------------------------- GSAM


@pytest.mark.parametrize("kind", MODELS)
def test_gsam_subtracts_a_component_orthogonal_to_the_perturbed_gradient(kind):
    alpha = 0.5
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch(kind)
    SAM(sgd(model), rho=0.1, gsam_alpha=alpha).backward(model, x, y, F.cross_entropy)
    perturbed = naive_sam_grads(reference, x, y, rho=0.1)  # plain SAM g'

    component = [(gp - g) / alpha for gp, g in zip(perturbed, grads_of(model), strict=True)]
    assert global_norm(component) > 1e-3
    cosine = dot(component, perturbed) / (global_norm(component) * global_norm(perturbed))
    assert abs(cosine) < 1e-9


@pytest.mark.parametrize("backup_normalized", [False, True])
@pytest.mark.parametrize("kind", MODELS)
def test_gsam_with_alpha_zero_is_plain_sam(kind, backup_normalized):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch(kind)
    sam = SAM(sgd(model), rho=0.1, gsam_alpha=0.0, backup_normalized=backup_normalized)
    sam.backward(model, x, y, F.cross_entropy, sharpness_m=6)
    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, rho=0.1, m=6))


def test_gsam_decompose_subtracts_alpha_times_part_of_h_orthogonal_to_descent():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(50, generator=gen, dtype=torch.float64)
    h = torch.randn(50, generator=gen, dtype=torch.float64)
    alpha = 0.7
    u = g / torch.sqrt((g * g).sum())
    expected = g - alpha * (h - (h * u).sum() * u)
    torch.testing.assert_close(gsam_decompose_(g.clone(), h, alpha, 1e-12), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("before", "after"), [(False, False), (True, False), (False, True), (True, True)])
def test_normalize_ascent_follows_the_asam_formula(before, after):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    w = torch.randn(40, generator=gen, dtype=torch.float64).abs()
    s = g * w if before else g
    expected = s / torch.sqrt((s * s).sum())
    if after:
        expected = expected * w
    out = normalize_ascent_(g.clone(), w, before_norm=before, after_norm=after, eps=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_asam_with_both_switches_is_original_asam_direction():
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    w = torch.randn(40, generator=gen, dtype=torch.float64).abs()
    expected = w * w * g / torch.sqrt(((w * g) ** 2).sum())  # |w|^2 g / || |w| g ||
    out = normalize_ascent_(g.clone(), w, before_norm=True, after_norm=True, eps=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- RandSAM


@pytest.mark.parametrize("kind", MODELS)
def test_randsam_perturbation_has_norm_rho_on_every_sub_batch(kind):
    model = make_model(kind)
    x, y = make_batch(kind)
    recorder = ParamRecorder(model)
    RandSAM(sgd(model), rho=0.07, seed=0).backward(model, x, y, recorder, sharpness_m=4)
    perturbations = recorder.perturbations()
    assert len(perturbations) == 3
    for e in perturbations:
        assert global_norm(e) == pytest.approx(0.07, rel=1e-9)


@pytest.mark.parametrize("kind", MODELS)
def test_randsam_grad_is_the_gradient_at_its_perturbation(kind):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch(kind)
    recorder = ParamRecorder(model)
    RandSAM(sgd(model), rho=0.3, seed=0).backward(model, x, y, recorder, sharpness_m=6)
    expected = naive_sam_grads(reference, x, y, rho=0.3, m=6, perturbations=recorder.perturbations())
    assert_grads_close(grads_of(model), expected)


def test_randsam_perturbation_does_not_depend_on_the_batch():
    perturbations = []
    for seed in (1, 2):
        model = make_model("mlp")
        x, y = make_batch("mlp", seed=seed)
        recorder = ParamRecorder(model)
        RandSAM(sgd(model), rho=0.1, seed=42).backward(model, x, y, recorder)
        perturbations.append(recorder.perturbations()[0])
    for a, b in zip(*perturbations, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_randsam_draws_fresh_noise_for_each_sub_batch():
    model = make_model("mlp")
    x, y = make_batch("mlp")
    recorder = ParamRecorder(model)
    RandSAM(sgd(model), rho=0.1, seed=0).backward(model, x, y, recorder, sharpness_m=6)
    first, second = recorder.perturbations()
    assert global_norm([a - b for a, b in zip(first, second, strict=True)]) > 1e-3


# ----------------------------------------------------------------------------------------- invariants

INVARIANT_CONFIGS = {
    "sam": (SAM, {"rho": 0.5}),
    "gsam_asam": (SAM, {"rho": 2.0, "gsam_alpha": 0.3, "asam_before_norm": True, "asam_after_norm": True}),
    "randsam": (RandSAM, {"rho": 0.5, "seed": 0}),
}


@pytest.mark.parametrize("config", list(INVARIANT_CONFIGS))
@pytest.mark.parametrize("kind", MODELS)
def test_backward_leaves_parameters_bitwise_unchanged(kind, config):
    cls, kwargs = INVARIANT_CONFIGS[config]
    model = make_model(kind, dtype=torch.float32)  # float32: w + e - e != w here, only a copy restores
    x, y = make_batch(kind, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    cls(sgd(model), **kwargs).backward(model, x, y, F.cross_entropy, sharpness_m=4)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_bf16_autocast_restores_fp32_parameters_bitwise_and_keeps_fp32_grads_and_stats():
    model = make_model("cnn_bn", dtype=torch.float32)
    x, y = make_batch("cnn_bn", dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    sam = SAM(sgd(model), rho=0.5, gsam_alpha=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = sam.backward(model, x, y, F.cross_entropy, perturb_fn=OBF(10.0), sharpness_m=4)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert p.grad.dtype == torch.float32
    assert {v.dtype for v in stats.values()} == {torch.float32}


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers()}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("m", [None, 4])
@pytest.mark.parametrize("config", list(INVARIANT_CONFIGS))
def test_batchnorm_running_stats_update_once_per_sub_batch_from_clean_pass(config, m, momentum):
    cls, kwargs = INVARIANT_CONFIGS[config]
    model = make_model("cnn_bn")
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = momentum
    reference = copy.deepcopy(model)
    x, y = make_batch("cnn_bn")

    cls(sgd(model), **kwargs).backward(model, x, y, F.cross_entropy, sharpness_m=m)

    step = len(x) if m is None else m
    with torch.no_grad():
        for start in range(0, len(x), step):
            reference(x[start : start + step])
    expected = bn_buffers(reference)
    actual = bn_buffers(model)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(actual[name], value), name
        else:
            torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_frozen_parameters_get_no_gradient_and_stay_out_of_the_perturbation():
    model = make_model("mlp")
    model[0].requires_grad_(False)
    reference = copy.deepcopy(model)
    x, y = make_batch("mlp")
    frozen_before = [p.detach().clone() for p in model[0].parameters()]

    sam = SAM(sgd(model), rho=0.5, gsam_alpha=0.3, asam_before_norm=True)
    sam.backward(model, x, y, F.cross_entropy, sharpness_m=6)
    sam.step()

    for p, b in zip(model[0].parameters(), frozen_before, strict=True):
        assert p.grad is None
        assert torch.equal(p, b)
    # trainable(reference) excludes the frozen layer: the norm and the perturbation cover the rest only
    expected = naive_sam_grads(reference, x, y, rho=0.5, gsam_alpha=0.3, before_norm=True, m=6)
    for p, g in zip(trainable(model), expected, strict=True):
        torch.testing.assert_close(p.grad, g, **TOL)


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unused = nn.Linear(3, 3)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))
        self.double()

    def forward(self, x):
        return self.body(x)


UNUSED_CONFIGS = {
    "sam": ({"rho": 0.1}, {"rho": 0.1}),
    "gsam": ({"rho": 0.1, "gsam_alpha": 0.4}, {"rho": 0.1, "gsam_alpha": 0.4}),
    "asam_both": (
        {"rho": 0.5, "asam_before_norm": True, "asam_after_norm": True},
        {"rho": 0.5, "before_norm": True, "after_norm": True},
    ),
}


@pytest.mark.parametrize("config", list(UNUSED_CONFIGS))
def test_parameters_unused_by_forward_keep_grad_none_and_others_match_reference(config):
    sam_kwargs, ref_kwargs = UNUSED_CONFIGS[config]
    model = WithUnusedLayer()
    reference = copy.deepcopy(model)
    x, y = make_batch("mlp")
    SAM(sgd(model), **sam_kwargs).backward(model, x, y, F.cross_entropy, sharpness_m=4)
    assert model.unused.weight.grad is None
    assert model.unused.bias.grad is None
    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, m=4, **ref_kwargs))


def test_unused_parameter_keeps_gradient_it_already_had():
    model = WithUnusedLayer()
    x, y = make_batch("mlp")
    existing = torch.full_like(model.unused.weight, 0.25)
    model.unused.weight.grad = existing.clone()
    SAM(sgd(model), rho=0.1).backward(model, x, y, F.cross_entropy)
    assert torch.equal(model.unused.weight.grad, existing)


# ----------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("m", [5, 7, 24, 0, -4])
def test_sharpness_m_that_does_not_divide_the_batch_raises(m):
    model = make_model("mlp")
    x, y = make_batch("mlp")
    with pytest.raises(ValueError, match="sharpness_m"):
        SAM(sgd(model)).backward(model, x, y, F.cross_entropy, sharpness_m=m)


def test_accum_steps_below_one_raises():
    model = make_model("mlp")
    x, y = make_batch("mlp")
    with pytest.raises(ValueError, match="accum_steps"):
        SAM(sgd(model)).backward(model, x, y, F.cross_entropy, accum_steps=0)


def test_targets_of_another_batch_size_raise():
    model = make_model("mlp")
    x, y = make_batch("mlp")
    with pytest.raises(ValueError, match="batch size"):
        SAM(sgd(model)).backward(model, x, y[:-1], F.cross_entropy)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rho": -0.1}, "rho"), ({"gsam_alpha": -1.0}, "gsam_alpha"), ({"eps": 0.0}, "eps")],
)
def test_invalid_sam_hyperparameters_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SAM(sgd(make_model("mlp")), **kwargs)


def test_base_optimizer_must_be_a_torch_optimizer():
    with pytest.raises(ValueError, match="base optimizer"):
        SAM(object())


def test_parameters_of_mixed_dtype_raise():
    model = make_model("mlp")
    model[0].float()
    with pytest.raises(ValueError, match="dtype"):
        SAM(sgd(model)).backward(model, *make_batch("mlp"), F.cross_entropy)


def test_all_parameters_frozen_raises():
    model = make_model("mlp").requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        SAM(sgd(model)).backward(model, *make_batch("mlp"), F.cross_entropy)


# ----------------------------------------------------------------------------------------- rho schedule


def test_lr_scheduler_on_sam_moves_base_lr_and_lr_prop_rho():
    model = make_model("mlp")
    reference = copy.deepcopy(model)
    x, y = make_batch("mlp")
    schedule = LrProportionalRho(rho_max=0.2, rho_min=0.0, lr_max=1.0, lr_min=0.0)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.8), rho_schedule=schedule)
    torch.optim.lr_scheduler.LambdaLR(sam, lambda epoch: 0.25)  # lr 0.8 -> 0.2

    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert sam.rho == pytest.approx(0.04)
    sam.backward(model, x, y, F.cross_entropy)
    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, rho=0.04))


# ----------------------------------------------------------------------------------------- closure form

CLOSURE_CONFIGS = {
    "sam": (SAM, {"rho": 0.2}),
    "gsam": (SAM, {"rho": 0.2, "gsam_alpha": 0.5}),
    "asam_both": (SAM, {"rho": 1.0, "asam_before_norm": True, "asam_after_norm": True}),
    "randsam": (RandSAM, {"rho": 0.2, "seed": 7}),
}


def closure_and_backward_twins(kind, config):
    cls, kwargs = CLOSURE_CONFIGS[config]
    model_a = make_model(kind)
    model_b = copy.deepcopy(model_a)
    x, y = make_batch(kind)
    sam_a = cls(torch.optim.SGD(model_a.parameters(), lr=0.5, momentum=0.9), **kwargs)
    sam_b = cls(torch.optim.SGD(model_b.parameters(), lr=0.5, momentum=0.9), **kwargs)

    def closure():
        loss = F.cross_entropy(model_a(x), y)
        loss.backward()
        return loss

    clean = F.cross_entropy(copy.deepcopy(model_a)(x), y)
    returned = sam_a.step(closure, model=model_a)
    sam_b.zero_grad()
    sam_b.backward(model_b, x, y, F.cross_entropy)
    sam_b.step()
    return model_a, model_b, returned, clean


@pytest.mark.parametrize("config", list(CLOSURE_CONFIGS))
@pytest.mark.parametrize("kind", MODELS)
def test_closure_step_gives_same_parameters_as_backward_then_step(kind, config):
    model_a, model_b, _, _ = closure_and_backward_twins(kind, config)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", list(CLOSURE_CONFIGS))
def test_closure_step_with_model_updates_batchnorm_stats_once(config):
    model_a, model_b, _, _ = closure_and_backward_twins("cnn_bn", config)
    for (name, a), b in zip(model_a.named_buffers(), model_b.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("config", list(CLOSURE_CONFIGS))
def test_closure_step_with_zero_lr_leaves_parameters_bitwise_unchanged(config):
    cls, kwargs = CLOSURE_CONFIGS[config]
    model = make_model("cnn_bn", dtype=torch.float32)  # float32: w + e - e != w here, only a copy restores
    x, y = make_batch("cnn_bn", dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    sam = cls(torch.optim.SGD(model.parameters(), lr=0.0), **kwargs)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    sam.step(closure, model=model)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_closure_step_returns_the_clean_loss():
    _, _, returned, clean = closure_and_backward_twins("mlp", "sam")
    assert float(returned.detach()) == pytest.approx(float(clean.detach()), rel=1e-12)


# ----------------------------------------------------------------------------------------- state_dict

BASES = {
    "sgd_momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr / 10, weight_decay=0.05),
}
SAM_KINDS = {
    # trained with these ...
    "sam": lambda base: SAM(
        base,
        rho_schedule=LrProportionalRho(rho_max=0.3, rho_min=0.05, lr_max=0.2, lr_min=0.0),
        gsam_alpha=0.3,
        asam_after_norm=True,
    ),
    "randsam": lambda base: RandSAM(base, rho=0.1, seed=123),
}
FRESH_KINDS = {
    # ... and resumed into optimizers built with other hyperparameters (and another RNG seed)
    "sam": lambda base: SAM(base, rho=0.9),
    "randsam": lambda base: RandSAM(base, rho=0.9, seed=999),
}


def train_steps(model, sam, first_step: int, count: int) -> None:
    for step in range(first_step, first_step + count):
        x, y = make_batch("cnn_bn", n=8, seed=100 + step)
        sam.zero_grad()
        sam.backward(model, x, y, F.cross_entropy, sharpness_m=4)
        sam.step()


@pytest.mark.parametrize("route", ["in_memory", "torch_save_file"])
@pytest.mark.parametrize("sam_kind", list(SAM_KINDS))
@pytest.mark.parametrize("base", list(BASES))
def test_state_dict_round_trip_resumes_bitwise_identically(base, sam_kind, route, tmp_path):
    model = make_model("cnn_bn")
    sam = SAM_KINDS[sam_kind](BASES[base](model.parameters(), 0.1))
    train_steps(model, sam, 0, 3)
    if route == "in_memory":
        saved = copy.deepcopy({"model": model.state_dict(), "optim": sam.state_dict()})
    else:
        torch.save({"model": model.state_dict(), "optim": sam.state_dict()}, tmp_path / "state.pt")
        saved = torch.load(tmp_path / "state.pt", weights_only=True)
    train_steps(model, sam, 3, 3)

    fresh = make_model("cnn_bn", seed=1)
    fresh_sam = FRESH_KINDS[sam_kind](BASES[base](fresh.parameters(), 0.7))
    fresh.load_state_dict(saved["model"])
    fresh_sam.load_state_dict(saved["optim"])
    train_steps(fresh, fresh_sam, 3, 3)

    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_state_dict_rejects_a_plain_optimizer_state():
    model = make_model("mlp")
    sam = SAM(sgd(model))
    with pytest.raises(ValueError, match="SAM state_dict"):
        sam.load_state_dict(sgd(model).state_dict())


@pytest.mark.parametrize("m", [2.5, 4.0, "4", True])
def test_sharpness_m_must_be_an_integer(m):
    model = nn.Linear(3, 2)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="sharpness_m"):
        sam.backward(model, x, y, nn.functional.cross_entropy, sharpness_m=m)


@pytest.mark.parametrize("kwargs", [{"rho": float("nan")}, {"rho": float("inf")}, {"gsam_alpha": float("nan")}])
def test_non_finite_hyperparameters_rejected(kwargs):
    with pytest.raises(ValueError, match="finite"):
        SAM(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), **kwargs)


def test_float64_logits_keep_their_precision():
    from pf_sweep.losses import OBF, BinaryCrossEntropy, CrossEntropy

    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    for loss in (OBF(C=2.0), BinaryCrossEntropy(), CrossEntropy()):
        value = loss(z, y)
        assert value.dtype == torch.float64, type(loss).__name__
        assert torch.autograd.grad(value, z)[0].dtype == torch.float64
    assert CrossEntropy()(z.to(torch.bfloat16), y).dtype == torch.float32


class SharedGradients(nn.Module):
    """Autograd returns ``token``'s gradient as a view into ``table``'s (batch 1), and ``bias``'s expanded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.table = nn.Parameter(torch.randn(1, 4, 5, dtype=torch.float64))
        self.token = nn.Parameter(torch.randn(1, 1, 5, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.head = nn.Linear(5, NUM_CLASSES, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.token.expand(len(x), -1, -1), x.view(len(x), 3, 5)], dim=1) + self.table
        return self.head(torch.tanh(tokens).mean(dim=1)) + self.bias.sum() * self.bias.detach().sum()


def test_gradients_that_share_memory_are_neither_scaled_twice_nor_written_in_place():
    model = SharedGradients()
    x = torch.randn(4, 15, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (4,))
    grads = torch.autograd.grad(F.cross_entropy(model(x[:1]), y[:1]), list(model.parameters()))
    assert grads[1].untyped_storage().data_ptr() == grads[0].untyped_storage().data_ptr()  # the cases exist
    assert grads[2].stride() == (0,)
    reference = copy.deepcopy(model)
    SAM(sgd(model), rho=0.3).backward(model, x, y, F.cross_entropy, sharpness_m=1)
    assert_grads_close(grads_of(model), naive_sam_grads(reference, x, y, rho=0.3, m=1))
