"""Replicated ranks sharing out a batch's work: GRPO's groups with a signal dealt so that every
rank forwards about as many tokens (methods/grpo.py, with beta 0 and ``skip_zero_advantage``)."""

from __future__ import annotations

import torch

from ..models.forward import first_column
from ..rollout.sampler import Samples, cat_padded, join_samples
from .dist import DistInfo, all_gather_object


def deal_groups(loads: list[float], owners: list[int], world_size: int) -> list[list[int]]:
    """Groups of these ``loads``, sampled on ranks ``owners``, dealt so that the ranks' sums come
    near equal while few groups move: each group starts on its own rank, then the most loaded rank
    gives the least loaded one the group that best halves their gap, while that lowers the larger
    of the two (the lower rank first on ties, so that every rank computes the same deal). The ranks'
    sums end apart by at most the heaviest group. Each rank's groups in ascending order."""
    shares = [[g for g, owner in enumerate(owners) if owner == r] for r in range(world_size)]
    while True:
        totals = [sum(loads[g] for g in share) for share in shares]
        high = max(range(world_size), key=lambda r: (totals[r], -r))
        low = min(range(world_size), key=lambda r: (totals[r], r))
        gap = totals[high] - totals[low]
        movable = [g for g in shares[high] if 0 < loads[g] < gap]  # each move lowers the sum of squared totals
        if not movable:
            return [sorted(share) for share in shares]
        g = min(movable, key=lambda g: (abs(gap - 2 * loads[g]), g))
        shares[high].remove(g)
        shares[low].append(g)


def _trimmed(samples: Samples, advantages: torch.Tensor) -> tuple[Samples, torch.Tensor]:
    """Without the prompt columns no row reads (left padding) and the completion columns after every
    row's last token."""
    p = first_column(samples.prompt_mask.bool())
    c = int(samples.completion_mask.bool().any(0).nonzero().max()) + 1 if samples.completion_mask.any() else 1
    cut = Samples(samples.prompt_ids[:, p:], samples.prompt_mask[:, p:], samples.completion_ids[:, :c],
                  samples.completion_mask[:, :c], samples.logprobs[:, :c], samples.finished)
    return cut, advantages[:, :c]


def _group_rows(groups, group_size: int) -> torch.Tensor:
    return torch.tensor([g * group_size + i for g in groups for i in range(group_size)], dtype=torch.long)


def balanced_groups(info: DistInfo, samples: Samples, advantages: torch.Tensor, live: list[int], group_size: int,
                    pad_id: int) -> tuple[Samples, torch.Tensor]:
    """Replicated ranks' groups with a signal (``live``, this rank's group indices), dealt so that
    each rank forwards about as many tokens (prompt once, then its G completions; ``deal_groups``):
    GRPO with beta 0 forwards only these, how many a rank holds is chance, and the step waits for
    the slowest rank. The gradients are summed over ranks and the loss's normalisers are summed
    before, so where a group is forwarded changes the update by float rounding only.

    The ranks exchange their loads; only where a group moves do they exchange samples, and then a
    rank's batch is its groups with a signal. A rank dealt none keeps its batch with every
    advantage zeroed, so that the caller's rule for a rank without a signal applies (GRPO forwards
    one group, a zero gradient, so that every rank still runs a forward)."""
    device = advantages.device
    tokens = samples.prompt_mask[::group_size].sum(-1) + samples.completion_mask.reshape(
        -1, group_size * samples.completion_mask.shape[1]).sum(-1)
    everyone = all_gather_object(list(zip(live, tokens[live].tolist())), info)  # (local group, load) per rank
    groups = [(r, g, load) for r, part in enumerate(everyone) for g, load in part]
    shares = deal_groups([load for _, _, load in groups], [r for r, _, _ in groups], info.world_size)
    if all(groups[i][0] == r for r, share in enumerate(shares) for i in share):
        return samples, advantages  # nothing moves: the caller forwards this rank's own groups with a signal
    dealt_to = {i: r for r, share in enumerate(shares) for i in share}
    leaving = [(i, g) for i, (r, g, _) in enumerate(groups) if r == info.rank and dealt_to[i] != info.rank]
    rows = _group_rows([g for _, g in leaving], group_size).to(device)
    parts = all_gather_object(([i for i, _ in leaving], samples.rows(rows).to("cpu"), advantages[rows].cpu()), info)
    staying = _group_rows([groups[i][1] for i in shares[info.rank] if groups[i][0] == info.rank], group_size).to(device)
    mine = [(samples.rows(staying), advantages[staying])]  # the groups that stay never leave the device
    for ids, part, part_advantages in parts:
        take = [k for k, i in enumerate(ids) if dealt_to[i] == info.rank]
        if take:
            index = _group_rows(take, group_size)
            mine.append((part.rows(index).to(device), part_advantages[index].to(device)))
    mine = [(s, a) for s, a in mine if len(a)]
    if not mine:  # dealt none: its own groups with no signal left (the caller forwards one, a zero gradient)
        return samples, torch.zeros_like(advantages)
    return _trimmed(join_samples([s for s, _ in mine], pad_id), cat_padded([a for _, a in mine]))
