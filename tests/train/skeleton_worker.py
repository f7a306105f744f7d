"""Two gloo ranks through the run skeleton (run by test_skeleton_dist.py in a subprocess).

    python skeleton_worker.py OUT_DIR
Each rank writes what it saw to OUT_DIR/rank{R}.json before teardown.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhfkit.train.checkpoint import latest_checkpoint
from rlhfkit.train.config import TrainConfig
from rlhfkit.train.optim import NonFiniteError, build_optimizer, build_scheduler
from rlhfkit.train.run import start_run


def _run(rank: int, out: str, nan_at: int | None) -> dict:
    cfg = TrainConfig(out_dir=out, max_steps=3, save_every=1, log_every=1, progress=False, report_to="none",
                      lr=0.1, schedule="constant")
    run = start_run(cfg, {"test": True}, "t")
    torch.manual_seed(rank)  # different weights per rank: attach must broadcast rank 0's
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model, cfg.lr)
    run.attach(model, optimizer, build_scheduler(optimizer, cfg.max_steps, 0, "constant"))
    seen = {"start_weight": model.weight.detach().tolist(), "checkpoints": []}
    try:
        for step in run.steps():
            loss = model(torch.full((1, 3), float(rank + 1))).sum() * 0.5
            if nan_at == step + 1 and rank == 1:
                loss = loss * float("nan")  # only rank 1 sees a NaN
            loss.backward()
            run.optimizer_step(loss)
            run.step_done(means={"local": rank * 10.0 + step}, shares={"part": rank + 1.0})
            seen["checkpoints"].append(latest_checkpoint(out).name)  # barrier: rank 0's save is complete
    except NonFiniteError as e:
        seen["error"] = str(e)
    run.close()
    return seen


def _rank(rank: int, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    result = {"plain": _run(rank, f"{out}/plain", None), "nan": _run(rank, f"{out}/nan", 2)}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(_rank, args=(sys.argv[1],), nprocs=2, join=True)
