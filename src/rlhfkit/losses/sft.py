"""Supervised fine-tuning loss (InstructGPT stage 1).

    L_SFT = - 1/N * sum_{b, t in completion} log pi_theta(y_{b,t} | x_b, y_{b,<t})

N is the number of completion tokens in the whole batch (not a mean per sequence), so long
answers are not under-weighted and gradient accumulation or several ranks give the same
update as one big batch when the caller passes the global N as ``num_tokens``.
"""

from __future__ import annotations

import torch

from .reduce import token_mean


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None):
    """logprobs: (B, T) log-probabilities of the target tokens; mask: (B, T) 1 on completion targets.

    Returns (loss, metrics). A mask with no tokens gives loss 0 that stays connected to the graph.
    """
    mask = mask.to(logprobs.dtype)
    loss = token_mean(-logprobs, mask, num_tokens)
    metrics = {"nll_sum": (-logprobs * mask).sum().detach(), "tokens": mask.sum().detach()}
    return loss, metrics
