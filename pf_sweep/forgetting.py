"""Perturbed-forgetting statistics (DESIGN.md, "Perturbed forgetting").

SAM already runs a clean forward pass at w and a perturbed one at w + e on the same sub-batch, so
everything here is computed from those two sets of logits: measuring forgetting costs no extra
forward pass. All results stay 0-d tensors so the caller decides when to pay for a host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORGETTING_KEYS = ("flip_rate", "loss_increase", "kl", "target_prob_drop")


@torch.no_grad()
def forgetting_stats(
    clean_logits: torch.Tensor,
    perturbed_logits: torch.Tensor,
    targets: torch.Tensor,
    clean_loss: torch.Tensor,
    perturbed_loss: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """What the perturbation made the model forget on this sub-batch.

    - ``flip_rate``: fraction of examples correct at w and wrong at w + e;
    - ``loss_increase``: L(w + e) - L(w);
    - ``kl``: mean KL(softmax z || softmax z');
    - ``target_prob_drop``: mean of p_y(w) - p_y(w + e) (softmax probabilities).
    """
    log_p = F.log_softmax(clean_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(perturbed_logits.detach().float(), dim=-1)
    idx = targets.view(-1, 1)
    correct = log_p.argmax(dim=-1) == targets
    correct_perturbed = log_q.argmax(dim=-1) == targets
    return {
        "flip_rate": (correct & ~correct_perturbed).float().mean(),
        "loss_increase": (perturbed_loss.detach() - clean_loss.detach()).float(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(),
        "target_prob_drop": (log_p.gather(1, idx).exp() - log_q.gather(1, idx).exp()).mean(),
    }
