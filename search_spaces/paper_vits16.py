"""paper_vits16: the release's ViT-S/16 ImageNet runs (the ViT-S/32 recipe, vanilla, SAM and GSAM).

Unlike ViT-S/32, SAM-max keeps rho constant and GSAM-max uses alpha 1.0; the release trains no
label smoothing, shrink-and-perturb, RandSAM or ASAM run for ViT-S/16.
Shared settings and how they map onto timm: ``search_spaces/_paper.py``.
"""

from __future__ import annotations

from search_spaces._paper import VIT, lr_prop, preset, sam

RHO = 0.6

RUNS = {
    "vanilla": {},
    "sam_max": sam("sam", "max", RHO),
    "sam_obf": sam("sam", "obf", RHO, obf_C=1000.0, obf_gamma=1.0),
    "gsam_max": sam("gsam", "max", **lr_prop(RHO, 0.0), gsam_alpha=1.0),
    "gsam_obf": sam("gsam", "obf", RHO, gsam_alpha=0.4, backup_normalized=True, obf_C=1000.0, obf_gamma=1.0),
}

SPACE = preset("paper_vits16", __doc__, {**VIT, "model": "vit_small_patch16_224"}, RUNS)
