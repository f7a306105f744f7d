"""Direct Preference Optimization (Rafailov et al. 2023), pairwise and Plackett-Luce.

Pairwise (eq. 7 of the paper), with r_hat(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)):

    L_DPO = - log sigma( r_hat(x, y_w) - r_hat(x, y_l) )

Rankings of n answers tau (best first), the Plackett-Luce model (paper, appendix A.3):

    L_PL = - sum_{i=1..n} [ r_hat(x, y_tau(i)) - log sum_{j=i..n} exp r_hat(x, y_tau(j)) ]

For n = 2 the two are equal. Log-probabilities are sums over completion tokens only. The
gradient w.r.t. log pi(y_w) is -beta * sigma(r_hat_l - r_hat_w), the opposite on log pi(y_l).

DPO can raise the margin while the chosen answers' own likelihood falls (likelihood
displacement). RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 2;
TRL's ``rpo_alpha``, later its ``sft`` loss term) adds the chosen answers' negative log-likelihood:

    L_RPO = L_DPO + alpha * NLL(y_w | x)

with the NLL here a mean over all chosen tokens of the global batch (as SFT's loss; the paper
divides each answer by its own length).

Other pairwise losses on the same log-ratio margin h = log(pi(y_w)/pi_ref(y_w)) -
log(pi(y_l)/pi_ref(y_l)) (TRL's ``loss_type``):

    conservative DPO, label smoothing eps (Mitchell 2023, "A note on DPO with noisy preferences"):
        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    IPO (Azar et al. 2023, eq. 17, tau = beta), with each answer's log-ratio per token:
        L = (h_tok - 1 / (2 beta))^2,  h_tok = log-ratio(y_w) / |y_w| - log-ratio(y_l) / |y_l|
    hinge (SLiC-HF, Zhao et al. 2023, its calibration loss on the log-ratio to the reference):
        L = max(0, 1 - beta h)

Eq. 17 writes IPO's h over whole answers; the per-token form is what the paper's experiments
used, as TRL (whose IPO is this one) confirmed with its authors, and it keeps 1/(2 beta)
comparable across answer lengths. The three apply to pairs only: a ranking of more than two
answers has the Plackett-Luce loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduce import pairs_right

PAIR_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, num_pairs: float | None = None,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, lengths: tuple | None = None):
    """All inputs (B,) sequence log-probs. Returns (loss, metrics of detached sums over the B pairs).
    ``loss_type``: sigmoid (the paper's; ``label_smoothing`` eps > 0: conservative DPO), ipo or hinge.
    ``lengths``: the (B,) token counts of the chosen and rejected answers, for IPO's per-token h."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # (B,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # (B,)
    margin = chosen_rewards - rejected_rewards  # beta h
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss_type == "ipo":
        if lengths is None:
            raise ValueError("loss_type='ipo' needs the answers' lengths (its log-ratios are per token)")
        h = (chosen_logps - ref_chosen_logps) / lengths[0].clamp(min=1) \
            - (rejected_logps - ref_rejected_logps) / lengths[1].clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    else:
        raise ValueError(f"loss_type must be one of {PAIR_LOSSES}; got {loss_type!r}")
    denom = chosen_logps.shape[0] if num_pairs is None else max(float(num_pairs), 1.0)
    return losses.sum() / denom, _sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)


def chosen_nll(chosen_logps: torch.Tensor, num_tokens: float):
    """RPO's term: -(sum of the chosen answers' (B,) log-probs) / the chosen tokens of the global batch."""
    return -chosen_logps.sum() / max(float(num_tokens), 1.0)


def plackett_luce_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float,
                       num_rankings: float | None = None):
    """logps, ref_logps, mask: (P, K), each row's answers best first, padding slots at the end."""
    valid = mask.bool()
    rewards = beta * (logps - ref_logps)  # (P, K)
    masked = rewards.masked_fill(~valid, float("-inf"))
    tail_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)  # (P, K): log sum_{j >= i} exp r_j
    terms = torch.where(valid, rewards - tail_lse, torch.zeros_like(rewards))
    denom = logps.shape[0] if num_rankings is None else max(float(num_rankings), 1.0)
    loss = -terms.sum() / denom
    others = valid.clone()
    others[:, 0] = False
    n_others = others.sum(-1).clamp(min=1)
    rejected = (rewards * others).sum(-1) / n_others  # (P,) mean implicit reward of the non-best answers
    rejected_logps = (logps * others).sum(-1) / n_others
    sums = _sums(rewards[:, 0], rejected, logps[:, 0], rejected_logps)
    # Preference accuracy over all ordered pairs of each ranking.
    better = torch.triu(torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device), 1)
    pair_ok = better & valid[:, :, None] & valid[:, None, :]  # (P, K, K)
    sums["correct"] = pairs_right(rewards[:, :, None] - rewards[:, None, :], pair_ok)
    sums["pairs"] = pair_ok.sum().float().detach()
    return loss, sums


def _sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    return {
        "rewards_chosen": chosen_rewards.sum().detach(),
        "rewards_rejected": rejected_rewards.sum().detach(),
        "margin": (chosen_rewards - rejected_rewards).sum().detach(),
        "correct": pairs_right(chosen_rewards - rejected_rewards, torch.ones_like(chosen_rewards, dtype=torch.bool)),
        "pairs": torch.tensor(float(chosen_rewards.shape[0])),
        "logps_chosen": chosen_logps.sum().detach(),
        "logps_rejected": rejected_logps.sum().detach(),
    }
