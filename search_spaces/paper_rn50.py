"""paper_rn50: the release's ResNet-50 ImageNet runs (90 epochs, global batch 4096, SGDW).

Vanilla, label smoothing and shrink-and-perturb baselines; SAM, GSAM and ASAM with the standard
(max) and the OBF perturbation; RandSAM. ``run_sweep.py --space paper_rn50 --runs sam_max,sam_obf``
runs a subset. Shared settings and how they map onto timm: ``search_spaces/_paper.py``.
"""

from __future__ import annotations

from search_spaces._paper import OBF_TINY_GAMMA, RESNET, lr_prop, preset, resnet_runs, sam

RUNS = {
    **resnet_runs(),
    "labelsmooth": {"smoothing": 0.1},
    "shrink_perturb": {"snp_factor": 1e-5},
    "sam_rand": sam("randsam", "max", 0.04),
    "asam_max": sam("asam", "max", **lr_prop(0.8, 0.4), asam_before_norm=True),
    "asam_obf": sam("asam", "obf", 0.8, asam_before_norm=True, **OBF_TINY_GAMMA),
}

SPACE = preset("paper_rn50", __doc__, {**RESNET, "model": "resnet50"}, RUNS)
