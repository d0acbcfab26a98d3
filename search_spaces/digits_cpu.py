"""digits_cpu: the embedded default sweep. SGD vs SAM vs SAM+OBF on built-in handwritten digits.

Searches rho (log-uniform), the perturbation batch size m (divisors of the per-worker batch), the
learning rate, and OBF's gamma when OBF is chosen. A few minutes on 2 CPUs.
"""

from __future__ import annotations

import optuna

from search_spaces.base import SearchSpace

BATCH = 64


def suggest(trial: optuna.Trial) -> dict | None:
    method = trial.suggest_categorical("method", ["sgd", "sam"])
    trial.suggest_float("lr", 0.01, 0.2, log=True)
    if method == "sam":
        perturbation = trial.suggest_categorical("perturbation", ["max", "obf"])
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        trial.suggest_categorical("sharpness_m", [8, 16, 32, 64])
        if perturbation == "obf":
            trial.suggest_float("obf_gamma", 0.1, 1.0)
    return None


SPACE = SearchSpace(
    name="digits_cpu",
    description=__doc__.strip().splitlines()[0],
    base={
        "dataset": "digits",
        "model": "pf_cnn_small",
        "epochs": 4,
        "batch_size": BATCH,
        "opt": "momentum",
        "sched": "cosine",
        "weight_decay": 5e-4,
    },
    suggest=suggest,
    points_to_evaluate=(
        {"method": "sam", "lr": 0.05, "perturbation": "max", "rho": 0.05, "sharpness_m": BATCH},
        {"method": "sam", "lr": 0.05, "perturbation": "obf", "rho": 0.05, "sharpness_m": BATCH, "obf_gamma": 1.0},
    ),
    metric="val/top1",
    mode="max",
    num_samples=6,
    max_concurrent=2,
)
