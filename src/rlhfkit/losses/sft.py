"""Supervised fine-tuning loss (InstructGPT stage 1).

    L_SFT = - 1/N * sum_{b, t in completion} log pi_theta(y_{b,t} | x_b, y_{b,<t})

N is the number of completion tokens in the whole batch (not a mean per sequence), so long
answers are not under-weighted and gradient accumulation or several ranks give the same
update as one big batch when the caller passes the global N as ``num_tokens``.

Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning
Perspective with Reward Rectification", arXiv 2508.05629; TRL's ``loss_type="dft"``) weighs each token's
term by its own probability, held constant (sg: no gradient through it):

    L_DFT = - 1/N * sum_{b, t in completion} sg(pi_theta(y_{b,t} | .)) * log pi_theta(y_{b,t} | .)
"""

from __future__ import annotations

import torch

from .reduce import token_mean

SFT_LOSSES = ("nll", "dft")


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None, form: str = "nll"):
    """logprobs: (B, T) log-probabilities of the target tokens; mask: (B, T) 1 on completion targets;
    ``form``: ``nll`` (L_SFT) or ``dft`` (L_DFT).

    Returns (loss, metrics); ``nll_sum`` is the plain NLL's either way. A mask with no tokens gives
    loss 0 that stays connected to the graph.
    """
    mask = mask.to(logprobs.dtype)
    per_token = -logprobs if form == "nll" else -logprobs * logprobs.detach().exp()
    loss = token_mean(per_token, mask, num_tokens)
    metrics = {"nll_sum": (-logprobs * mask).sum().detach(), "tokens": mask.sum().detach()}
    return loss, metrics
