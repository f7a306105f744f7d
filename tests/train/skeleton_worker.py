"""Two gloo ranks through the run skeleton (run by test_skeleton_dist.py in a subprocess).

    python skeleton_worker.py OUT_DIR [eval-fails | eval-resumes]
Each rank writes what it saw to OUT_DIR/rank{R}.json (or rank{R}-{MODE}.json) before teardown.
"""

import datetime
import json
import os
import shutil
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


def _with_eval(rank: int, out: str, resume: bool, fail_at: int | None) -> dict:
    """4 steps, an eval every 2 that all-reduces (as a distributed eval does), checkpoints only at
    the end; the eval of step ``fail_at`` fails on rank 1 before its collective."""
    cfg = TrainConfig(out_dir=out, max_steps=4, save_every=100, eval_every=2, log_every=1, progress=False,
                      report_to="none", lr=0.1, schedule="constant", resume=resume)
    run = start_run(cfg, {"test": True}, "t")
    torch.manual_seed(0)  # the same start in every run of the process
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model, cfg.lr)
    run.attach(model, optimizer, build_scheduler(optimizer, cfg.max_steps, 0, "constant"))

    def evaluate() -> dict:
        if fail_at == run.done and rank == 1:
            raise MemoryError("out of memory in the eval")
        score = model(torch.ones(1, 3)).detach().double().reshape(1) + torch.rand(1, dtype=torch.float64)
        dist.all_reduce(score)  # the eval's random draw: a resumed run must draw what the straight run drew
        return {"score": score.item()}

    seen = {}
    try:
        for step in run.steps(evaluate):
            loss = (model(torch.full((1, 3), float(rank + 1))) - torch.rand(1)).pow(2).sum()
            loss.backward()
            run.optimizer_step(loss)
            run.step_done(means={"local": rank * 10.0 + step}, evaluate=evaluate)
        seen["evals"] = run.evals
    except Exception as e:  # rank 1: the eval's error; rank 0: the collective that waited on rank 1, timed out
        seen["error"] = f"{type(e).__name__}: {e}"
    seen["weight"] = model.weight.detach().tolist()
    run.close()
    return seen


def _rank(rank: int, out: str, mode: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out}/pg-{mode}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    if mode == "eval-fails":
        result = _with_eval(rank, f"{out}/resumed", False, 2)
    elif mode == "eval-resumes":
        result = {"resumed": _with_eval(rank, f"{out}/resumed", True, None),
                  "straight": _with_eval(rank, f"{out}/straight", False, None)}
        if rank == 0:  # the straight run cut back to its step-2 checkpoint, the one completed after its eval
            shutil.copytree(f"{out}/straight", f"{out}/amended")
            shutil.rmtree(f"{out}/amended/checkpoints/step-0000004")
        dist.barrier()
        result["amended"] = _with_eval(rank, f"{out}/amended", True, None)
    else:
        result = {"plain": _run(rank, f"{out}/plain", None), "nan": _run(rank, f"{out}/nan", 2)}
    with open(f"{out}/rank{rank}{'-' + mode if mode else ''}.json", "w") as f:
        json.dump(result, f)
    if mode != "eval-fails":  # a timed-out group is not torn down cleanly
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(_rank, args=(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""), nprocs=2, join=True)
