"""Reward-model ranking loss (InstructGPT stage 2, Ouyang et al. 2022, eq. 1).

    loss(theta) = - 1/C(K,2) * E_{(x, y_w, y_l)} [ log sigma( r_theta(x, y_w) - r_theta(x, y_l) ) ]

For each prompt all C(K,2) ordered pairs of its K ranked outputs enter together, each output
scored once; the pair losses are averaged per prompt, then over prompts. Plain (chosen,
rejected) rows are the K = 2 case. Equal ranks (ties) form no pair.

Option beside the paper's form: ``center_coef`` adds center_coef * (2 * mean_k r(x, y_k))^2 per
prompt (Eisenstein et al. 2023, "Helping or Herding"), which keeps each prompt's scores centred
on 0 so that scores are comparable across prompts, which is what a PPO critic needs. The 2 is
there so that a value copied from TRL means the same: TRL's ``center_rewards_coefficient`` adds
coef * (r_chosen + r_rejected)^2 per pair, which at K = 2 is exactly this term. 0 (the default)
is the paper's loss.

``margins`` (TRL's ``margin`` column, Llama 2's margin loss, Touvron et al. 2023 eq. 2): a
per-prompt m by which the better output must win, -log sigma(r_w - r_l - m); None (or 0) is
the paper's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduce import pairs_right


def ranking_loss(rewards: torch.Tensor, mask: torch.Tensor, ranks: torch.Tensor | None = None,
                 num_prompts: float | None = None, center_coef: float = 0.0, margins: torch.Tensor | None = None):
    """rewards, mask, ranks: (P, K), outputs of each prompt in a row (rank 0 = best, lower is better);
    margins: (P,) or None.

    Returns (loss, sums) where ``sums`` holds detached totals (pairs, correct pairs, margin) for
    the caller to divide by global counts. ``num_prompts`` is the global prompt count.
    """
    if ranks is None:
        ranks = torch.arange(rewards.shape[1], device=rewards.device).expand_as(rewards)
    valid = mask.bool()
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (P, K, K): i beats j
    margin = rewards[:, :, None] - rewards[:, None, :]  # (P, K, K) r_i - r_j
    pairs = better.sum((1, 2))  # (P,)
    shifted = margin if margins is None else margin - margins.to(margin.dtype)[:, None, None]
    per_prompt = -(F.logsigmoid(shifted) * better).sum((1, 2)) / pairs.clamp(min=1)  # (P,)
    if center_coef:
        prompt_mean = (rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (P,)
        per_prompt = per_prompt + center_coef * (2 * prompt_mean) ** 2
    denom = rewards.shape[0] if num_prompts is None else max(float(num_prompts), 1.0)
    loss = per_prompt.sum() / denom
    sums = {
        "pairs": pairs.sum().detach().float(),
        "correct": pairs_right(margin, better),
        "margin": (margin * better).sum().detach(),
    }
    return loss, sums
