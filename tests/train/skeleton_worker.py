"""Two gloo ranks through the run skeleton (run by test_skeleton_dist.py in a subprocess).

    python skeleton_worker.py OUT_DIR [eval-fails | eval-resumes]
Each rank writes what it saw to OUT_DIR/rank{R}.json (or rank{R}-{MODE}.json) before teardown.
"""

import datetime
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


class Killed(Exception):
    pass


def _with_eval(rank: int, out: str, resume: bool, fail_at: int | None = None, killed_in: int | None = None,
               failing: tuple = (1,), stop_on: int | None = None, log_every: int = 1) -> dict:
    """4 steps, an eval every 2 that all-reduces (as a distributed eval does), checkpoints only at
    the end; the eval of step ``fail_at`` fails on the ``failing`` ranks before its collective; both
    ranks are killed at the start of step ``killed_in``; rank ``stop_on``'s eval says stop."""
    cfg = TrainConfig(out_dir=out, max_steps=4, save_every=100, eval_every=2, log_every=log_every, progress=False,
                      report_to="none", lr=0.1, schedule="constant", resume=resume)
    run = start_run(cfg, {"test": True}, "t")
    torch.manual_seed(0)  # the same start in every run of the process
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model, cfg.lr)
    run.attach(model, optimizer, build_scheduler(optimizer, cfg.max_steps, 0, "constant"))

    def evaluate() -> dict:
        if fail_at == run.done and rank in failing:
            raise MemoryError("out of memory in the eval")
        score = model(torch.ones(1, 3)).detach().double().reshape(1) + torch.rand(1, dtype=torch.float64)
        dist.all_reduce(score)  # the eval's random draw: a resumed run must draw what the straight run drew
        return {"score": score.item(), **({"stop": True} if rank == stop_on else {})}

    seen = {}
    try:
        for step in run.steps(evaluate):
            if killed_in == step + 1:
                raise Killed
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
    elif mode == "eval-resumes":  # OUT/resumed: what eval-fails left
        result = {"resumed": _with_eval(rank, f"{out}/resumed", True),
                  "straight": _with_eval(rank, f"{out}/straight", False),
                  "killed": _with_eval(rank, f"{out}/amended", False, killed_in=3)}
        with open(f"{out}/amended/checkpoints/step-0000002/trainer_state.json") as f:
            result["killed"]["state"] = json.load(f)  # step 2's, completed after its eval
        result["amended"] = _with_eval(rank, f"{out}/amended", True)
        # an eval failing on both ranks at step 2, off log_every; run again on resume it says stop on rank 0 only
        result["stop-failed"] = _with_eval(rank, f"{out}/stop", False, fail_at=2, failing=(0, 1), log_every=3)
        result["stopped"] = _with_eval(rank, f"{out}/stop", True, stop_on=0, log_every=3)
    else:
        result = {"plain": _run(rank, f"{out}/plain", None), "nan": _run(rank, f"{out}/nan", 2)}
    with open(f"{out}/rank{rank}{'-' + mode if mode else ''}.json", "w") as f:
        json.dump(result, f)
    if mode != "eval-fails":  # a timed-out group is not torn down cleanly
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(_rank, args=(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""), nprocs=2, join=True)
