"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8):
unpaired answers, each labelled desirable or undesirable, against a reference point z_0.

    r(x, y) = log pi_theta(y|x) - log pi_ref(y|x)                      (summed over the answer's tokens)
    z_0     = max(0, mean over the batch's mismatched pairs (x_i, y_j) of r(x_i, y_j))   (no gradient)
    v(x, y) = lambda_D sigma( beta (r(x, y) - z_0) )   if y is desirable
              lambda_U sigma( beta (z_0 - r(x, y)) )   if y is undesirable
    L       = mean over the batch of ( lambda_y - v(x, y) )

z_0 estimates KL(pi_theta || pi_ref) from answers the policy did not write for these prompts
(another row's), clamped at 0 and detached, as in the paper's code and TRL's. With lambda_y = 1
the per-example loss is 1 - sigma(...), TRL's form. The paper (section 4.2) recommends
lambda_D n_D / (lambda_U n_U) in [1, 4/3] (``weights_advice``).

``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", the
unpaired APO-zero; TRL's name) anchors at 0 in place of z_0, with no mismatched pairs:

    L = mean over the batch of ( 1 - sigma(beta r) if desirable, sigma(beta r) if undesirable )

(TRL's form: without lambda weights' effect on the anchor; the weights still multiply each term.)

``bco``, BCO (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
Alignment"; TRL's BCOTrainer, without its optional density-ratio weights): a binary classifier
whose logit is the implicit reward, each answer's cross-entropy against a reward shift delta,
the running mean of beta r over every answer of the steps before (methods/common.py
``RewardShift``, the value passed as ``reference_point``):

    L = mean over the batch of ( -lambda_D log sigma(beta r - delta) if desirable,
                                 -lambda_U log sigma(-(beta r - delta)) if undesirable )

(lambda 1 and 1 are BCO's own; other weights multiply each term, as KTO's.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KTO_LOSSES = ("kto", "apo_zero_unpaired", "bco")


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor | float,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
             num_examples: float | None = None) -> tuple[torch.Tensor, dict]:
    """(P,) summed log-probs of the policy and the reference, ``desirable`` (P,) bool,
    ``reference_point`` z_0 (detached, already clamped; unused by apo_zero_unpaired; bco's delta,
    on the scale of beta r).
    Returns (loss, sums): the loss is the per-example terms' sum over ``num_examples`` (default
    P: the mean); ``sums`` holds detached sums over the examples of each kind (``rewards_chosen``
    = beta r over the desirable ones, ``rewards_rejected``, ``logps_chosen``, ``logps_rejected``)."""
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown KTO loss {loss_type!r}; one of {', '.join(KTO_LOSSES)}")
    ratio = logps - ref_logps
    good = desirable.to(ratio.dtype)
    if loss_type == "bco":
        logit = beta * ratio - reference_point
        terms = -good * desirable_weight * F.logsigmoid(logit) - (1 - good) * undesirable_weight * F.logsigmoid(-logit)
    else:
        anchor = 0.0 if loss_type == "apo_zero_unpaired" else reference_point
        shifted = beta * (ratio - anchor)
        terms = good * desirable_weight * (1 - torch.sigmoid(shifted)) + \
            (1 - good) * undesirable_weight * (1 - torch.sigmoid(-shifted))
    count = ratio.shape[0] if num_examples is None else max(float(num_examples), 1.0)
    rewards = beta * ratio.detach()
    sums = {"rewards_chosen": (rewards * good).sum(), "rewards_rejected": (rewards * (1 - good)).sum(),
            "logps_chosen": (logps.detach() * good).sum(), "logps_rejected": (logps.detach() * (1 - good)).sum()}
    return terms.sum() / count, sums


def reference_point(kl_sum: float, kl_pairs: float) -> float:
    """z_0: the mean log-ratio of the mismatched pairs, clamped at 0 (module docstring)."""
    return max(kl_sum / max(kl_pairs, 1.0), 0.0)


def weights_advice(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """The paper's advice (section 4.2) where the data breaks it: lambda_D n_D / (lambda_U n_U)
    should lie in [1, 4/3]; a sentence with the weights that would, or None."""
    if n_desirable == 0 or n_undesirable == 0:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 - 1e-9 <= ratio <= 4 / 3 + 1e-9:
        return None
    low, high = undesirable_weight * n_undesirable / n_desirable, 4 / 3 * undesirable_weight * n_undesirable / n_desirable
    return (f"{n_desirable} desirable and {n_undesirable} undesirable answers: desirable_weight x {n_desirable} / "
            f"(undesirable_weight x {n_undesirable}) = {ratio:.3g}, where the KTO paper advises 1 to 4/3; "
            f"desirable_weight in [{low:.3g}, {high:.3g}] would be (with undesirable_weight={undesirable_weight:g})")
