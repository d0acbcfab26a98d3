"""digits_spurious_cpu: SGD vs SAM vs SAM+OBF on digits with a class-coded spurious pixel.

In training 90% of images carry a border pixel whose position encodes the class; ``validation``
places it at random, so ``val/top1`` rewards models that forgot the cue, and the extra evaluation
set ``validation_aligned`` (cue always right) shows how much a model still leans on it
(``eval/digits_spurious:validation_aligned/top1`` minus ``val/top1``). Same searched fields as
``digits_cpu``; a few minutes on 2 CPUs.
"""

from __future__ import annotations

import dataclasses

from search_spaces import digits_cpu

SPACE = dataclasses.replace(
    digits_cpu.SPACE,
    name="digits_spurious_cpu",
    description=__doc__.strip().splitlines()[0],
    base={
        **digits_cpu.SPACE.base,
        "dataset": "digits_spurious",
        "eval_sets": [["digits_spurious", "validation_aligned"]],
    },
)
