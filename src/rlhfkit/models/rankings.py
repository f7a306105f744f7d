"""Log-probs of ranked answers (data/prefs.py's batches) under a causal LM: each answer's sum of
log pi(y_t | x, y_<t) over its tokens, from one forward of the plain rows or of each prompt shared
by its answers; the reference's pass over a dataset (DPO's and KTO's precomputed reference); and
the preference accuracy of a model's implicit reward on held-out rankings. Shared by DPO, its
reference-free forms (CPO, SimPO, ORPO), online DPO and KTO."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data.encode import to_device
from ..data.prefs import RankingBatch, SharedPromptBatch, collate_rankings
from ..losses.dpo import ld_weights
from ..losses.reduce import pairs_right
from .forward import as_forward, eval_mode, log_square_mass, predecessor_logprobs, token_logprobs


def sequence_logps(model, batch: RankingBatch | SharedPromptBatch, ld_alpha: float | None = None) -> torch.Tensor:
    """log pi(y|x) summed over completion tokens, one per output of the batch, in slot order. (N,)

    A ``SharedPromptBatch`` forwards each prompt once for all its answers: the same sums with
    the prompt's tokens computed once instead of K times (data/prefs.py). ``ld_alpha``: LD-DPO's
    sums (``ld_weights``)."""
    return output_logps(model, batch, ld_alpha).sums


class OutputLogps(NamedTuple):
    sums: torch.Tensor  # (N,) log pi(y|x) over each output's tokens; LD-DPO's sums with ld_alpha
    plain: torch.Tensor  # (N,) the plain sums (RPO's NLL reads these), ``sums`` itself without ld_alpha
    aligned: torch.Tensor | None  # (N,) WPO's mean of log pi(y_t | .) - log sum_v pi(v | .)^2; None unless asked


def output_logps(model, batch: RankingBatch | SharedPromptBatch, ld_alpha: float | None = None,
                 aligned: bool = False) -> OutputLogps:
    """Each output's log-probs from one forward (``OutputLogps``); ``aligned``: with WPO's
    means, without gradient."""
    stat = log_square_mass if aligned else None
    if isinstance(batch, SharedPromptBatch):
        picked, square = as_forward(model, predecessor_logprobs, batch.input_ids, batch.attend, batch.position_ids,
                                    batch.predecessor, batch.targets, stat)  # (M,)

        def per_output(values):
            return values.new_zeros(batch.num_outputs).index_add(0, batch.owner, values)

        means = per_output(picked.detach() - square) / batch.lengths.clamp(min=1) if aligned else None
        plain = sums = per_output(picked)
        if ld_alpha is not None:
            starts = batch.lengths.cumsum(0) - batch.lengths  # each output's first token among the M
            place = torch.arange(len(batch.owner), device=picked.device) - starts[batch.owner]
            sums = per_output(picked * ld_weights(place, shared_lengths(batch)[batch.owner], ld_alpha).to(picked.dtype))
        return OutputLogps(sums, plain, means)
    out = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask, stat)  # (N, T)
    logprobs, square = out if aligned else (out, None)
    scored = F.pad(batch.completion_mask[:, 1:], (1, 0))  # the tokens with a log-prob (not one after no prompt)
    means = ((logprobs.detach() - square) * scored).sum(-1) / scored.sum(-1).clamp(min=1) if aligned else None
    plain = sums = (logprobs * batch.completion_mask.to(logprobs.dtype)).sum(-1)
    if ld_alpha is not None:  # each token's place among its answer's tokens with a log-prob, from 0
        weights = ld_weights(scored.cumsum(-1) - 1, shared_lengths(batch)[:, None], ld_alpha).to(logprobs.dtype)
        sums = (logprobs * batch.completion_mask.to(logprobs.dtype) * weights).sum(-1)
    return OutputLogps(sums, plain, means)


def shared_lengths(batch: RankingBatch | SharedPromptBatch) -> torch.Tensor:
    """(N,) the token count an output shares with the other of its pair: the shorter's."""
    grid = batch.grid(batch.output_lengths()).masked_fill(~batch.mask.bool(), torch.iinfo(torch.long).max)
    return grid.min(-1).values[batch.slot // batch.mask.shape[1]]


def precompute_reference(reference, examples: list, pad_id: int, batch_size: int = 64,
                         ld_alpha: float | None = None) -> list:
    """The examples with ``ref_logps`` filled in by one pass of the reference model (``ld_alpha``:
    LD-DPO's sums, as the loss reads them)."""
    with eval_mode(reference):
        out = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            batch = to_device(collate_rankings(chunk, pad_id), next(reference.parameters()).device)
            grid = batch.grid(sequence_logps(reference, batch, ld_alpha))
            out.extend(dataclasses.replace(e, ref_logps=tuple(grid[p, : len(e.ranks)].tolist())) for p, e in enumerate(chunk))
    return out


def no_reference(examples: list) -> list:
    """The examples with zeros as their reference log-probs: the forms read log pi(y|x) itself."""
    return [dataclasses.replace(e, ref_logps=(0.0,) * len(e.ranks)) for e in examples]


def preference_accuracy(model, examples: list, pad_id: int, batch_size: int = 64, per_token: bool = False) -> float:
    """Fraction of ordered pairs whose implicit reward log(pi/pi_ref) ranks them right (ties count half);
    ``per_token``: the reward over each answer's token count (``per_token_reward``)."""
    with eval_mode(model):
        correct = pairs = 0
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate_rankings(examples[i: i + batch_size], pad_id), next(model.parameters()).device)
            reward = batch.grid(sequence_logps(model, batch)) - batch.ref_logps  # (P, K)
            if per_token:
                reward = reward / batch.grid(batch.output_lengths()).clamp(min=1)
            r, m = batch.ranks, batch.mask.bool()
            better = (r[:, :, None] < r[:, None, :]) & m[:, :, None] & m[:, None, :]
            correct += float(pairs_right(reward[:, :, None] - reward[:, None, :], better))
            pairs += int(better.sum())
    return correct / max(pairs, 1)
