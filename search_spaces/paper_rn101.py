"""paper_rn101: the release's ResNet-101 ImageNet runs (the ResNet-50 recipe, vanilla, SAM and GSAM).

The release trains no label smoothing, shrink-and-perturb, RandSAM or ASAM run for ResNet-101.
Shared settings and how they map onto timm: ``search_spaces/_paper.py``.
"""

from __future__ import annotations

from search_spaces._paper import RESNET, preset, resnet_runs

RUNS = resnet_runs()

SPACE = preset("paper_rn101", __doc__, {**RESNET, "model": "resnet101"}, RUNS)
