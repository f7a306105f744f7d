"""GRPO on 2 replicated gloo ranks with beta 0: the groups with a signal dealt out evenly over the
ranks (methods/grpo.py ``BALANCE_RANKS``, the default) against each rank forwarding its own.

    python benchmarks/balance.py [--rounds 3] [--steps 12] [--assets DIR] [--shape reference|30m|120m]

Outside BENCHMARK.md's contract (one process, every group forwarded). The reference model (or
``--shape``'s) and prompts of ``run.py``; 16 prompts a step (8 a rank), 4 samples each, 16 new tokens, 1 thread a
rank. The reward gives a signal to about a third of the groups, at random over the ranks: on 40%
of the prompts (by answer) it is the parity of the completion's count of the digit 1, elsewhere 0
(``--reward rank0``: that parity on every prompt rank 0 samples, 0 on rank 1's: the worst case).
Each round runs both settings in fresh processes, alternating which goes first, and prints one
JSON line per run (median seconds per step and per update after 2 warm-up steps, the losses) and
a summary: the median (min-max) over rounds of the ratios off / on (above 1: dealing is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def third_signal(prompts, completions, answer, **_):
    """A signal for about a third of the groups: see the module's docstring."""
    return [float(c.count("1") % 2) if int(a) % 5 < 2 else 0.0 for c, a in zip(completions, answer)]


def rank0_signal(prompts, completions, answer, **_):
    """``--reward rank0``, the worst case: the parity signal on every group rank 0 samples, none on rank 1's."""
    return [float(c.count("1") % 2) if os.environ["RANK"] == "0" else 0.0 for c in completions]


REWARDS = {"third": third_signal, "rank0": rank0_signal}


def _rank(rank: int, out: str, model: str, tokenizer: str, data: str, steps: int, balance: bool,
          reward: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    import rlhfkit.methods.grpo as grpo
    from rlhfkit.train.config import TrainConfig

    grpo.BALANCE_RANKS = balance
    plain, updates = grpo.update, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = plain(*args, **kwargs)
        updates.append(time.perf_counter() - start)
        return result

    grpo.update = timed
    cfg = grpo.GRPOConfig(model=model, tokenizer=tokenizer, train_data=data, group_size=4, prompts_per_step=16,
                          max_new_tokens=16, beta=0.0, mu=1, rewards="contains_answer",
                          train=TrainConfig(out_dir=f"{out}/run", max_steps=steps, lr=1e-5, log_every=1,
                                            save_every=0, progress=False, strategy="replicate"))
    grpo.run_grpo(cfg, reward_fns=[REWARDS[reward]])
    if rank == 0:
        lines = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl") if '"train/loss"' in line]
        times = [b["time_s"] - a["time_s"] for a, b in zip(lines, lines[1:])]
        result = {"balance": balance, "sec_per_step": statistics.median(times[1:]),
                  "update_s": statistics.median(updates[2:]), "losses": [m["train/loss"] for m in lines],
                  "forwarded": statistics.mean(m["train/update_rows_forwarded"] for m in lines)}
        Path(f"{out}/result.json").write_text(json.dumps(result))
    dist.barrier()


def run_once(args, balance: bool) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(out, args.model, args.tokenizer, args.data, args.steps, balance, args.reward), nprocs=2,
                 join=True)
        return json.loads(Path(out, "result.json").read_text())


def main() -> None:
    from run import assets  # benchmarks/run.py: the reference model, tokenizer and prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--assets", default=None)
    p.add_argument("--shape", default="reference", choices=("reference", "30m", "120m"))
    p.add_argument("--reward", default="third", choices=tuple(REWARDS),
                   help="third: a signal on about a third of the groups, at random; rank0: on all of rank 0's, none "
                        "of rank 1's (the worst case)")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    args = p.parse_args()
    paths = assets(argparse.Namespace(assets=args.assets, model=args.model, data=args.data, tokenizer=None, rm=None,
                                      shape=args.shape, seq="short"))
    args.model, args.tokenizer, args.data = paths["model"], paths["tokenizer"], str(Path(paths["data"]) / "prompts.jsonl")
    ratios, runs = [], {True: [], False: []}
    for r in range(args.rounds):
        pair = {}
        for balance in ((True, False) if r % 2 == 0 else (False, True)):
            pair[balance] = run_once(args, balance)
            runs[balance].append(pair[balance])
            print(json.dumps(pair[balance]), flush=True)
        ratios.append({k: pair[False][k] / pair[True][k] for k in ("sec_per_step", "update_s")})
    summary = {k: {"on": statistics.median(x[k] for x in runs[True]), "off": statistics.median(x[k] for x in runs[False]),
                   "ratio_off_on": statistics.median(x[k] for x in ratios),
                   "min": min(x[k] for x in ratios), "max": max(x[k] for x in ratios)} for k in ("sec_per_step", "update_s")}
    print(json.dumps({"summary": summary, "shape": args.shape, "reward": args.reward, "rounds": args.rounds, "steps": args.steps}), flush=True)


if __name__ == "__main__":
    main()
