"""Jobs on 2 gloo ranks under train.strategy (run by test_fsdp.py in a subprocess).

    python fsdp_worker.py OUT TINY_DIR QWEN_DIR
Every job writes its metrics through the run itself; what a rank measures besides goes to
OUT/rank{R}.json, written before teardown (gloo can abort at exit).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods_setup import (  # noqa: E402
    RUNS,
    dynamic_sampling_config,
    even_answer_digits,
    first_of_rank0,
    gkd_config,
    greedy_ppo_with_ptx,
    method_config,
    seeded_backend,
    small,
    teacher_folder,
    three_pairs,
    tr_dpo_config,
)

import rlhfkit.train.run as run_module  # noqa: E402
from rlhfkit.methods.grpo import run_grpo  # noqa: E402
from rlhfkit.train.config import replace  # noqa: E402

METHODS = ("sft", "rm", "dpo", "kto", "grpo", "rloo", "ppo", "distill")
JOBS = [(m, model, "fsdp") for model in ("tiny", "qwen") for m in METHODS] + \
       [(m, model, "replicate") for model in ("tiny", "qwen") for m in ("grpo", "rloo", "ppo", "distill")] + \
       [("online_dpo", model, strategy) for model in ("tiny", "qwen") for strategy in ("fsdp", "replicate")]


class Killed(BaseException):
    pass


def _jobs(rank: int, out: Path, assets: dict) -> dict:
    seen = {}
    original = run_module.Run.step_done

    def measuring(self, *args, **kwargs):
        seen.setdefault(self.cfg.out_dir, self.resident_bytes())
        return original(self, *args, **kwargs)

    run_module.Run.step_done = measuring
    for method, model, strategy in JOBS:
        cfg = method_config(method, assets[model], out / f"{method}-{model}-{strategy}", 3, log_every=1,
                            strategy=strategy)
        RUNS[method](cfg)
    RUNS["ppo"](greedy_ppo_with_ptx(assets["tiny"], out / "ppo-greedy"))  # replicated: the test runs it in one process
    # PPO under bf16, sharded and replicated: the frozen reward model scores in fp32 either way
    for strategy in ("fsdp", "replicate"):
        RUNS["ppo"](method_config("ppo", assets["tiny"], out / f"ppo-bf16-{strategy}", 1, log_every=1,
                                  strategy=strategy, dtype="bf16"))
    # distillation on answers each prompt draws alike wherever it is sampled: the test runs it in one process
    RUNS["distill"](method_config("distill", assets["tiny"], out / "distill-seeded", 3, log_every=1,
                                  strategy="replicate"), backend=seeded_backend(assets["tiny"]))
    # TR-DPO's sync in GRPO, every optimizer step, sharded and replicated (the same samples): the test compares them
    for strategy in ("fsdp", "replicate"):
        RUNS["grpo"](replace(method_config("grpo", assets["tiny"], out / f"grpo-tr-{strategy}", 3, log_every=1,
                                           strategy=strategy), sync_ref_model=True, ref_model_sync_steps=1))
    # online DPO with one untied pair in all (rank 0's first prompt): rank 1 is dealt none and forwards one at
    # zero weight; sharded and replicated, the test compares them
    for strategy in ("fsdp", "replicate"):
        RUNS["online_dpo"](method_config("online_dpo", assets["tiny"], out / f"online_dpo-one-pair-{strategy}", 3,
                                         log_every=1, strategy=strategy), reward_fns=[first_of_rank0])
        # three pairs, one a forward: dealt 2 and 1, so rank 1 adds a forward at zero weight (FSDP2's collectives)
        RUNS["online_dpo"](method_config("online_dpo", assets["tiny"], out / f"online_dpo-three-{strategy}", 3,
                                         log_every=1, strategy=strategy, micro_batch_size=1), reward_fns=[three_pairs])
    # online DPO on answers each prompt draws alike wherever it is sampled (every pair trained), replicated (the
    # seeded sampler reads the live policy): the test runs it in one process
    RUNS["online_dpo"](replace(method_config("online_dpo", assets["tiny"], out / "online_dpo-seeded", 3, log_every=1,
                                             strategy="replicate"), ties="first"), backend=seeded_backend(assets["tiny"]))
    # BCO's pairs, sharded: the reward shift is a running mean over both ranks' answers; the test runs it in one process
    RUNS["dpo"](replace(method_config("dpo", assets["tiny"], out / "dpo-bco-fsdp", 3, log_every=1, strategy="fsdp"),
                        loss_type="bco_pair"))
    # ORPO, sharded: no reference model; the test runs it in one process
    RUNS["orpo"](method_config("orpo", assets["tiny"], out / "orpo-tiny-fsdp", 3, log_every=1, strategy="fsdp"))
    # TR-DPO, sharded: each rank mixes its shards of the reference; the last step's checkpoint holds them; its
    # held-out accuracy at step 3 reads the moved, sharded reference on every rank
    RUNS["dpo"](replace(tr_dpo_config(assets["tiny"], out / "dpo-tr", 3, sync_steps=1, strategy="fsdp"),
                        eval_data=small(assets["tiny"], "prefs_eval.jsonl", 16), train__eval_every=3))
    # GKD's mix, sharded: the teacher samples (seq_kd) on its unsharded copy; the test runs it in one process
    for data in (False, True):  # and on the rows' own answers, each rank its share of the step's rows
        RUNS["distill"](gkd_config(assets["tiny"], out / f"distill-gkd-{data}", data, strategy="fsdp"))
    # DCP resume: an uninterrupted 4-step run; one killed in step 3 (after the step-2 checkpoint)
    # and resumed here (2 -> 2); one killed alike and left for the test to resume in 1 process.
    def cfg(name):
        return method_config("sft", assets["tiny"], out / name, 4, log_every=1, strategy="fsdp", save_every=2)

    RUNS["sft"](cfg("full"))

    def dies(self, *args, **kwargs):
        if self.done == 2:
            raise Killed
        return measuring(self, *args, **kwargs)

    for name in ("cut22", "cut21"):
        run_module.Run.step_done = dies
        try:
            RUNS["sft"](cfg(name))
        except Killed:
            pass
    # the same run with an eval every 2 steps and no save cadence: each eval step's sharded checkpoint
    # is written before its eval and completed after it; once straight, once killed in step 3
    def with_evals(name):
        return replace(method_config("sft", assets["tiny"], out / name, 4, log_every=1, strategy="fsdp",
                                     save_every=100), train__eval_every=2,
                       eval_data=small(assets["tiny"], "sft_eval.jsonl", 8), eval_max_new_tokens=4)

    try:
        RUNS["sft"](with_evals("evals-cut"))
    except Killed:
        pass
    run_module.Run.step_done = measuring
    RUNS["sft"](with_evals("evals"))
    RUNS["sft"](replace(cfg("cut22"), train__resume=True))
    RUNS["sft"](replace(cfg("cut12"), train__resume=True))  # cut in one process by the test: 1 -> 2
    RUNS["sft"](replace(cfg("cut12-whole"), train__resume=True))  # cut there unsharded: into the shards
    RUNS["dpo"](tr_dpo_config(assets["tiny"], out / "dpo-tr-whole", 4, sync_steps=1, strategy="fsdp", save_every=2,
                              resume=True))  # TR-DPO cut there unsharded: its whole reference into the shards
    # GRPO and PPO on 2 replicated ranks: each rank's sampling RNG must come back on resume
    for method in ("grpo", "ppo"):
        online = lambda name: method_config(method, assets["tiny"], out / name, 4, log_every=1, save_every=2)  # noqa: E731
        RUNS[method](online(f"{method}-full"))
        run_module.Run.step_done = dies
        try:
            RUNS[method](online(f"{method}-cut"))
        except Killed:
            pass
        run_module.Run.step_done = measuring
        RUNS[method](replace(online(f"{method}-cut"), train__resume=True))
    # DAPO's dynamic sampling: each rank fills its share of the batch, and they sample as many rounds
    run_grpo(dynamic_sampling_config(assets["tiny"], out / "grpo-dynamic", 3, log_every=1, strategy="fsdp"),
             reward_fns=[even_answer_digits])
    # beta 0 on 2 replicated ranks: groups without a signal left out of the update, or not; left out
    # and dealt out evenly over the ranks (the default), or each rank forwarding its own
    import rlhfkit.methods.grpo as grpo_module
    import rlhfkit.train.balance as balance_module

    deal, forwarded_rows = balance_module.deal_groups, grpo_module.forwarded_rows
    deals, forwarded = [], []

    def dealing(loads, owners, world_size):
        shares = deal(loads, owners, world_size)
        deals.append({"loads": loads, "owners": owners, "shares": shares})
        return shares

    def forwarding(run, advantages, mask, cfg):
        rows = forwarded_rows(run, advantages, mask, cfg)
        forwarded.append(len(rows))
        return rows

    balance_module.deal_groups, grpo_module.forwarded_rows = dealing, forwarding
    for skip, balance in ((True, True), (False, True), (True, False)):
        grpo_module.BALANCE_RANKS = balance
        cfg = method_config("grpo", assets["tiny"], out / (f"grpo-skip-{skip}" + ("" if balance else "-own")), 3,
                            log_every=1, strategy="replicate")
        run_grpo(replace(cfg, beta=0.0, skip_zero_advantage=skip), reward_fns=[even_answer_digits])
        if (skip, balance) == (True, True):
            balanced = {"deals": list(deals), "forwarded": list(forwarded)}
    balance_module.deal_groups, grpo_module.forwarded_rows = deal, forwarded_rows
    grpo_module.BALANCE_RANKS = True
    # minibatches of 2 of the 4 prompts (1 a rank), a negligible step: each rank's gradients before
    # they are summed, for the test to compare with the whole batch's
    stepping, grads = run_module.Run.optimizer_step, {}

    def recording(self, loss, *args, **kwargs):
        grads.setdefault(self.cfg.out_dir, []).append(
            torch.cat([p.grad.flatten() for p in self.modules[0].parameters() if p.grad is not None]))
        return stepping(self, loss, *args, **kwargs)

    run_module.Run.optimizer_step = recording
    for size in (None, 2):
        cfg = method_config("grpo", assets["tiny"], out / f"grpo-minibatch-{size}", 2, log_every=1,
                            strategy="replicate")
        run_grpo(replace(cfg, beta=0.0, mu=1, minibatch_size=size, train__lr=1e-12), reward_fns=[even_answer_digits])
    run_module.Run.optimizer_step = stepping
    torch.save({Path(k).name: v for k, v in grads.items()}, out / f"grads-rank{rank}.pt")
    # the kernels under auto: the ranks' own timings disagree here, and every rank takes rank 0's choice
    from rlhfkit.models import kernels

    os.environ["RLHFKIT_FAST_LINEAR"] = "auto"
    kernels.pin_kernels({})
    kernels.time_products = (lambda: (0.5, 1.0)) if rank == 0 else (lambda: (2.0, 1.0))
    RUNS["sft"](method_config("sft", assets["tiny"], out / "sft-auto", 1))
    chosen = kernels.linear_kernel()[0]
    os.environ["RLHFKIT_FAST_LINEAR"] = "1"
    return {"bytes": seen, "linear_kernel": chosen, "balanced": balanced}


def _rank(rank: int, out: str, tiny: str, qwen: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    torch.set_num_threads(1)
    assets = {"tiny": {"base": Path(tiny) / "base", "data": Path(tiny) / "data"},
              "qwen": {"base": Path(qwen), "data": Path(tiny) / "data"}}
    result = _jobs(rank, Path(out), assets)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    for base in (Path(sys.argv[2]) / "base", Path(sys.argv[3])):  # distillation's teachers, before the ranks start
        teacher_folder({"base": base})
    teacher_folder({"base": Path(sys.argv[2]) / "base"}, 5.0)
    mp.spawn(_rank, args=tuple(sys.argv[1:4]), nprocs=2, join=True)
