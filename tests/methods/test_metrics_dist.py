"""Rollout metrics on 2 gloo ranks (spawned here) are the whole batch's, as one process's.

A maximum, a standard deviation or a variance ratio averaged over the ranks' own values is none
of them: GRPO logged a longest completion of 4.5 tokens, PPO an explained variance of -15.6
where one process had -8.4.
"""

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhfkit.losses.ppo import explained_variance
from rlhfkit.methods.grpo import Rollout, high_entropy, normalised_over_batch, scaled_by_batch, step_metrics
from rlhfkit.train.dist import DistInfo, all_reduce_sum


def _batch(rows: slice):
    """A stand-in for GRPO's rollout of 8 samples (2 groups of 4), or the rows ``rows`` of it."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 9, 4, 4, 2, 5, 7, 1])
    mask = (torch.arange(10)[None] < lengths[:, None]).float()
    rewards = torch.rand(8, generator=g)
    rewards[2] = float("nan")  # an abstention
    outcome = SimpleNamespace(rewards=rewards[rows], per_function={"f": rewards[rows]},
                              errors={"f": 1} if rows.start == 0 else {})
    return Rollout(SimpleNamespace(completion_mask=mask[rows]), outcome, torch.randn(8, 10, generator=g)[rows], 1.0)


def _values():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), (torch.rand(8, 6, generator=g) > 0.4).float()


def _rank(rank: int, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    info = DistInfo(rank, 2)
    half = slice(4 * rank, 4 * rank + 4)  # one group each
    metrics = step_metrics(_batch(half), 4, info)
    values, returns, mask = (t[half] for t in _values())
    ev = explained_variance(values, returns, mask, total=lambda sums: all_reduce_sum(sums, info)).item()
    scaled = scaled_by_batch(_batch(half), info).advantages
    gdpo = normalised_over_batch(_batch(half), info).advantages
    entropy, mask = _values()[0].abs()[half], _values()[2][half]
    kept = high_entropy(entropy, mask, 0.3, info)
    torch.save({"metrics": metrics, "ev": ev, "scaled": scaled, "kept": kept, "gdpo": gdpo}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_log_the_whole_batchs_statistics(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path), f"file://{tmp_path / 'pg'}"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = step_metrics(_batch(slice(0, 8)), 4)
    assert one["completion_len_max"] == 9.0 and one["reward/f_errors"] == 1
    for key in ("reward_mean", "reward_std", "completion_len_mean", "completion_len_max", "reward/f_mean",
                "reward/f_std", "reward/f_errors"):
        for r in ranks:  # each rank logs the whole batch's value (reduce_metrics then averages equals)
            assert abs(r["metrics"][key] - one[key]) < 1e-6, (key, r["metrics"][key], one[key])
    whole = explained_variance(*_values()).item()
    halves = [explained_variance(*(t[s] for t in _values())).item() for s in (slice(0, 4), slice(4, 8))]
    assert abs(sum(halves) / 2 - whole) > 0.05  # the average of the ranks' own is another number
    for r in ranks:
        assert abs(r["ev"] - whole) < 1e-5
    # scale_rewards=batch divides by the std of all 7 scored rewards of both ranks (unbiased, as torch's)
    batch = _batch(slice(0, 8))
    rewards = batch.outcome.rewards
    expected = batch.advantages / (rewards[~rewards.isnan()].std() + 1e-4)
    assert torch.allclose(scaled_by_batch(batch, DistInfo()).advantages, expected, atol=1e-6)
    assert torch.allclose(torch.cat([r["scaled"] for r in ranks]), expected, atol=1e-6)
    # GDPO's batch normalisation of the summed values: over both ranks' samples, an abstained one left out at 0
    present = ~rewards.isnan()
    summed = batch.advantages[:, 0]
    gdpo = torch.where(present, (summed - summed[present].mean()) / (summed[present].std() + 1e-4), 0.0)
    assert torch.allclose(normalised_over_batch(batch, DistInfo()).advantages, gdpo[:, None].expand(8, 10), atol=1e-6)
    assert torch.allclose(torch.cat([r["gdpo"] for r in ranks]), gdpo[:, None].expand(8, 10), atol=1e-6)
    # top_entropy_quantile's threshold is over both ranks' tokens
    kept = high_entropy(_values()[0].abs(), _values()[2], 0.3, DistInfo())
    assert torch.equal(torch.cat([r["kept"] for r in ranks]), kept)
    halves = torch.cat([high_entropy(_values()[0].abs()[s], _values()[2][s], 0.3, DistInfo()) for s in (slice(0, 4), slice(4, 8))])
    assert not torch.equal(halves, kept)  # each rank's own threshold would keep others
    own = rewards[4:].std()  # a rank's own std would be another number
    assert abs(float(own) - float(rewards[~rewards.isnan()].std())) > 0.01  # 0.249 vs 0.262
