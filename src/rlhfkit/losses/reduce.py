"""Named loss reductions over masked token tensors.

The denominator is passed in explicitly (``num_tokens``, ``num_sequences``): under gradient
accumulation or several ranks the caller gives the *global* count, so splitting a batch into
pieces cannot change the objective.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    values = values * mask  # (B, T)
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over masked entries; 0 (still connected to the graph) where the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """sum over all masked tokens / num_tokens (default: this batch's masked-token count)."""
    denom = mask.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
    return masked_sum(values, mask) / denom


def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor, num_sequences: float | None = None) -> torch.Tensor:
    """1/G sum_i 1/|o_i| sum_t values: each sequence's token mean, averaged over sequences."""
    per_seq = masked_sum(values, mask, dim=-1) / mask.sum(-1).clamp(min=1)  # (B,)
    denom = values.shape[0] if num_sequences is None else max(float(num_sequences), 1.0)
    return per_seq.sum() / denom


def seq_mean_token_sum_norm(values: torch.Tensor, mask: torch.Tensor, max_tokens: int,
                            num_sequences: float | None = None) -> torch.Tensor:
    """Dr. GRPO: sum_i sum_t values / (G * max_tokens), a constant per-length normaliser."""
    denom = values.shape[0] if num_sequences is None else max(float(num_sequences), 1.0)
    return masked_sum(values, mask) / (denom * max_tokens)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries only (unbiased variance, as in PPO implementations).

    ``total``: how a tensor of partial sums becomes the whole's (default: as is); e.g. an
    all-reduce, so that several ranks whiten with the statistics of all their entries.
    """
    total = total or (lambda sums: sums)
    mask = mask.to(values.dtype)
    sum_x, count = total(torch.stack([masked_sum(values, mask), mask.sum()]))
    mean = sum_x / count.clamp(min=1)
    centred = values - mean
    var = total(masked_sum(centred**2, mask)) / (count.clamp(min=2) - 1)
    out = centred * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def pairs_right(diff: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """How many of the ordered ``pairs`` (bool) a score difference ``diff`` (better minus worse)
    puts right, a tie counting half: the expected hit of a uniform tie-break, so a constant score
    is right on half the pairs (the RM's and DPO's accuracies, training and held out, count so)."""
    return (((diff > 0) & pairs).sum() + 0.5 * ((diff == 0) & pairs).sum()).float().detach()
