"""paper_vits32: the release's ViT-S/32 ImageNet runs (300 epochs, global batch 4096, AdamW, BCE).

Vanilla, label smoothing and shrink-and-perturb baselines; SAM, GSAM and ASAM with the standard
(max) and the OBF perturbation; RandSAM. Note the GSAM pairing, opposite to the ResNets': here the
OBF run backs up the normalised ascent gradient and the max run does not.
Shared settings and how they map onto timm: ``search_spaces/_paper.py``.
"""

from __future__ import annotations

from search_spaces._paper import OBF_TINY_GAMMA, VIT, lr_prop, preset, sam

RHO = 0.6

RUNS = {
    "vanilla": {},
    "labelsmooth": {"smoothing": 0.1},
    "shrink_perturb": {"snp_factor": 1e-5},
    "sam_max": sam("sam", "max", **lr_prop(RHO, 0.0)),
    "sam_obf": sam("sam", "obf", RHO, obf_C=1000.0, obf_gamma=1.0),
    "sam_rand": sam("randsam", "max", RHO),
    "gsam_max": sam("gsam", "max", **lr_prop(RHO, 0.0), gsam_alpha=0.4),
    "gsam_obf": sam("gsam", "obf", RHO, gsam_alpha=0.4, backup_normalized=True, obf_C=1000.0, obf_gamma=1.0),
    "asam_max": sam("asam", "max", 6.0, asam_after_norm=True),
    "asam_obf": sam("asam", "obf", 6.0, asam_after_norm=True, **OBF_TINY_GAMMA),
}

SPACE = preset("paper_vits32", __doc__, {**VIT, "model": "vit_small_patch32_224"}, RUNS)
