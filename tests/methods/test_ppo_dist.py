"""PPO on 2 gloo ranks (spawned here) equals one process holding the whole batch.

Each rank holds half of every minibatch; with token means taken over all ranks' tokens and
advantages whitened with all ranks' statistics, the summed gradients and the whitened values
must be those of a single process.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from methods_setup import reward_folder

from rlhfkit.data.rows import read_rows
from rlhfkit.losses.reduce import masked_whiten
from rlhfkit.methods.ppo import PPOConfig, load_models, make_experience, minibatch_loss
from rlhfkit.rollout.backend import SamplerBackend
from rlhfkit.train.dist import DistInfo, all_reduce_grads, all_reduce_sum
from rlhfkit.train.loop import reduce_dict


def _experience(base: str, data: str):
    torch.set_num_threads(1)
    cfg = PPOConfig(model=base, reward_model=base + "-reward", critic=base, minibatch_size=16)
    models, tok = load_models(cfg)
    prompts = [tok(r.data["prompt"])["input_ids"] for r in read_rows(data)[:16]]
    torch.manual_seed(0)  # the same samples in every process
    exp, _ = make_experience(models, SamplerBackend(tok, models["actor"]), prompts, cfg, beta=0.05)
    return models, exp, cfg


def _grads(models) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for m in (models["actor"], models["critic"]) for p in m.parameters()
                      if p.grad is not None])


def _rank(rank: int, base: str, data: str, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    info = DistInfo(rank, 2)
    models, exp, cfg = _experience(base, data)
    index = torch.arange(16)[rank::2]  # this rank's half of the minibatch (unequal token counts)
    counts = reduce_dict({"tokens": exp.mask[index].sum().item()}, info)
    loss, _ = minibatch_loss(models["actor"], models["critic"], exp, index, cfg, counts)
    loss.backward()
    all_reduce_grads(torch.nn.ModuleDict({"a": models["actor"], "c": models["critic"]}), info)
    torch.manual_seed(1)
    values, mask = torch.randn(16, 5), (torch.rand(16, 5) > 0.3).float()
    mine = masked_whiten(values[rank::2], mask[rank::2], total=lambda sums: all_reduce_sum(sums, info))
    torch.save({"grads": _grads(models), "whitened": mine}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_give_the_one_process_gradients_and_whitening(tiny, tmp_path):
    base, data = str(tiny["base"]), str(tiny["data"] / "prompts_train.jsonl")
    reward_folder(tiny)  # base + "-reward", made before the ranks start
    mp.spawn(_rank, args=(base, data, str(tmp_path), f"file://{tmp_path / 'pg'}"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    models, exp, cfg = _experience(base, data)
    loss, _ = minibatch_loss(models["actor"], models["critic"], exp, torch.arange(16), cfg,
                             {"tokens": exp.mask.sum().item()})
    loss.backward()
    one = _grads(models)
    assert one.abs().max() > 0
    for r in ranks:
        torch.testing.assert_close(r["grads"], one, atol=1e-6, rtol=1e-4)

    torch.manual_seed(1)
    values, mask = torch.randn(16, 5), (torch.rand(16, 5) > 0.3).float()
    whole = masked_whiten(values, mask)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["whitened"] * mask[rank::2], whole[rank::2] * mask[rank::2], atol=1e-5, rtol=1e-5)
