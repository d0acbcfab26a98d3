"""Losses and perturbation objectives (pf_sweep.losses) against closed forms written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pf_sweep.losses import (
    LOSSES,
    OBF,
    BinaryCrossEntropy,
    CrossEntropy,
    build_loss,
    build_perturbation,
    register,
)

N, K = 16, 5


def logits_and_targets(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Spread-out logits; half the examples get a large target logit, so p_y covers (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    z = 2.0 * torch.randn(N, K, generator=g, dtype=torch.float64)
    z[torch.arange(0, N, 2), y[0::2]] += 4.0
    return z.to(dtype), y


# ----------------------------------------------------------------------------------------- OBF


def obf_logit_gradient(z: torch.Tensor, y: torch.Tensor, C: float, gamma: float, sigmoid: bool) -> torch.Tensor:
    """(u - alpha p - (1 - alpha) y) / batch, per example, from docs/sam.md, in float64 Python loops."""
    z = z.double()
    n, k = z.shape
    out = torch.empty(n, k, dtype=torch.float64)
    lam = 0.0 if C < 0 else 1.0 / C
    for i in range(n):
        if sigmoid:
            p = [1.0 / (1.0 + math.exp(-float(z[i, j]))) for j in range(k)]
        else:
            exps = [math.exp(float(z[i, j])) for j in range(k)]
            p = [e / sum(exps) for e in exps]
        alpha = gamma * max(0.0, (1.0 - lam / p[int(y[i])]) / (1.0 - lam))
        for j in range(k):
            onehot = 1.0 if j == int(y[i]) else 0.0
            out[i, j] = (1.0 / k - alpha * p[j] - (1.0 - alpha) * onehot) / n
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("C", [1.5, 10.0, 1000.0, -1.0])
@pytest.mark.parametrize("sigmoid", [True, False], ids=["sigmoid", "softmax"])
def test_obf_gradient_wrt_logits_is_closed_form(sigmoid, C, gamma):
    z, y = logits_and_targets()
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(OBF(C, gamma, sigmoid)(z, y), z)
    torch.testing.assert_close(grad.double(), obf_logit_gradient(z.detach(), y, C, gamma, sigmoid), rtol=1e-6, atol=1e-7)


def test_obf_test_data_has_examples_on_both_sides_of_the_clamp():
    # with C = 1.5 (lambda = 2/3) some examples have p_y < lambda (alpha clamped to 0) and some not
    z, y = logits_and_targets()
    p_y = torch.sigmoid(z.double())[torch.arange(N), y]
    assert (p_y < 2 / 3).any()
    assert (p_y > 2 / 3).any()


@pytest.mark.parametrize("sigmoid", [True, False], ids=["sigmoid", "softmax"])
def test_obf_gradient_of_float64_logits_is_closed_form(sigmoid):
    z, y = logits_and_targets(seed=3, dtype=torch.float64)
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(OBF(4.0, 0.7, sigmoid)(z, y), z)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, obf_logit_gradient(z.detach(), y, 4.0, 0.7, sigmoid), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("C", [0.0, 0.5, 1.0])
def test_obf_rejects_C_in_zero_one(C):
    with pytest.raises(ValueError, match="C"):
        OBF(C)


@pytest.mark.parametrize("gamma", [-0.1, 1.01])
def test_obf_rejects_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma"):
        OBF(10.0, gamma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_obf_rejects_non_integer_targets(dtype):
    z, y = logits_and_targets()
    with pytest.raises(ValueError, match="integer"):
        OBF(10.0)(z, y.to(dtype))


def test_obf_rejects_one_hot_targets():
    z, y = logits_and_targets()
    with pytest.raises(ValueError, match="1-d"):
        OBF(10.0)(z, F.one_hot(y, K))


# ----------------------------------------------------------------------------------------- BCE


def bce_elements(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))), elementwise, float64."""
    z = z.double()
    s = 1.0 / (1.0 + torch.exp(-z))
    return -(t * torch.log(s) + (1.0 - t) * torch.log(1.0 - s))


def smoothed_one_hot(y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """timm convention: off value smoothing / K, on value 1 - smoothing + smoothing / K."""
    t = torch.full((len(y), K), smoothing / K, dtype=torch.float64)
    t[torch.arange(len(y)), y] = 1.0 - smoothing + smoothing / K
    return t


REDUCTIONS = {
    "mean": lambda e: e.mean(),
    "sum": lambda e: e.sum(),
    "sum_mean": lambda e: e.sum(1).mean(),
    "mean_mean": lambda e: e.mean(1).mean(),
    "sum_sum": lambda e: e.sum(1).sum(),
    "mean_sum": lambda e: e.mean(1).sum(),
}


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_bce_matches_hand_written_formula(reduction, smoothing):
    z, y = logits_and_targets(seed=1)
    expected = REDUCTIONS[reduction](bce_elements(z, smoothed_one_hot(y, smoothing)))
    actual = BinaryCrossEntropy(smoothing, reduction)(z, y)
    assert actual.dim() == 0
    assert float(actual) == pytest.approx(float(expected), rel=1e-6)


def test_bce_uses_dense_targets_as_given():
    z, _y = logits_and_targets(seed=2)
    g = torch.Generator().manual_seed(9)
    soft = torch.softmax(torch.randn(N, K, generator=g), dim=1)
    expected = bce_elements(z, soft.double()).sum(1).mean()
    assert float(BinaryCrossEntropy(0.0, "sum_mean")(z, soft)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("reduction", ["avg", "", "none", "mean_", "sum_mean_sum", "mean_avg"])
def test_bce_rejects_unknown_reduction(reduction):
    with pytest.raises(ValueError, match="reduction"):
        BinaryCrossEntropy(0.0, reduction)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0])
def test_bce_rejects_smoothing_outside_zero_one(smoothing):
    with pytest.raises(ValueError, match="smoothing"):
        BinaryCrossEntropy(smoothing)


def test_bce_rejects_float_class_targets():
    z, y = logits_and_targets()
    with pytest.raises(ValueError, match="integer"):
        BinaryCrossEntropy()(z, y.float())


# ----------------------------------------------------------------------------------------- CE


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_with_smoothing_matches_hand_written_formula(smoothing):
    z, y = logits_and_targets(seed=4)
    log_p = torch.log_softmax(z.double(), dim=1)
    nll = -log_p[torch.arange(N), y]
    uniform = -log_p.mean(1)
    expected = ((1.0 - smoothing) * nll + smoothing * uniform).mean()
    assert float(CrossEntropy(smoothing)(z, y)) == pytest.approx(float(expected), rel=1e-6)


def test_cross_entropy_accepts_bfloat16_logits_and_returns_float32():
    z, y = logits_and_targets(seed=4)
    assert CrossEntropy()(z.bfloat16(), y).dtype == torch.float32


@pytest.mark.parametrize("smoothing", [-0.1, 1.0])
def test_cross_entropy_rejects_smoothing_outside_zero_one(smoothing):
    with pytest.raises(ValueError, match="smoothing"):
        CrossEntropy(smoothing)


# ----------------------------------------------------------------------------------------- registries


def test_build_loss_ce_passes_smoothing_and_ignores_other_keywords():
    loss = build_loss("ce", smoothing=0.2, obf_C=5.0, bce_reduction="sum")
    assert isinstance(loss, CrossEntropy)
    assert loss.label_smoothing == 0.2


def test_build_loss_bce_defaults_to_sum_mean():
    loss = build_loss("bce")
    assert isinstance(loss, BinaryCrossEntropy)
    assert (loss.reduction, loss.smoothing) == ("sum_mean", 0.0)


def test_build_loss_bce_passes_smoothing_and_reduction():
    loss = build_loss("bce", smoothing=0.1, bce_reduction="mean")
    assert (loss.reduction, loss.smoothing) == ("mean", 0.1)


def test_build_loss_rejects_unknown_name_listing_allowed_ones():
    with pytest.raises(ValueError, match=r"'mse'.*bce, ce"):
        build_loss("mse")


def test_build_perturbation_max_is_none():
    assert build_perturbation("max", obf_C=5.0) is None


def test_build_perturbation_obf_passes_its_arguments():
    obf = build_perturbation("obf", obf_C=5.0, obf_gamma=0.5, obf_sigmoid=False, smoothing=0.3)
    assert isinstance(obf, OBF)
    assert (obf.C, obf.gamma, obf.sigmoid) == (5.0, 0.5, False)


def test_build_perturbation_obf_defaults():
    obf = build_perturbation("obf")
    assert (obf.C, obf.gamma, obf.sigmoid) == (1000.0, 1.0, True)


def test_build_perturbation_rejects_unknown_name_listing_allowed_ones():
    with pytest.raises(ValueError, match=r"'random'.*max, obf"):
        build_perturbation("random")


def test_build_perturbation_obf_validates_C():
    with pytest.raises(ValueError, match="C"):
        build_perturbation("obf", obf_C=0.5)


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="twice"):
        register(LOSSES, "ce")(lambda **_: None)
    assert build_loss("ce").__class__ is CrossEntropy
