"""digits_spurious_cpu: SGD vs SAM vs SAM+OBF on digits with a class-coded spurious pixel.

In training 90% of images carry a border pixel whose position encodes the class; ``validation``
places it at random, so ``val/top1`` rewards models that forgot the cue, and the extra evaluation
set ``validation_aligned`` (cue always right) shows how much a model still leans on it
(``eval/digits_spurious:validation_aligned/top1`` minus ``val/top1``). Same searched fields as
``digits_cpu``; a few minutes on 2 CPUs.
"""

from __future__ import annotations

from search_spaces.base import SearchSpace
from search_spaces.digits_cpu import BATCH, suggest

SPACE = SearchSpace(
    name="digits_spurious_cpu",
    description=__doc__.strip().splitlines()[0],
    base={
        "dataset": "digits_spurious",
        "eval_sets": [["digits_spurious", "validation_aligned"]],
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
