"""paper_cifar10_finetune: the release's CIFAR-10 fine-tuning of its ResNet-50 and ViT-S/32 ImageNet runs.

Each run starts from the final checkpoint of an ImageNet run: ``run_sweep.py --space
paper_cifar10_finetune --from-sweep results/paper_rn50 --from-sweep results/paper_vits32`` (or one
of them with ``--runs``). Settings and sources: ``search_spaces/_paper.py`` (``cifar_finetune``).
"""

from __future__ import annotations

from search_spaces._paper import finetune_preset

SPACE = finetune_preset("paper_cifar10_finetune", __doc__, "tfds/cifar10", 10)
