"""LoRA under train.strategy=fsdp on 2 gloo ranks (run by test_lora_fsdp.py in a subprocess).

    python lora_fsdp_worker.py OUT TINY_DIR
Each method's metrics are written by the run itself; rank{R}.json marks a rank that finished.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods_setup import RUNS, method_config, teacher_folder  # noqa: E402

from rlhfkit.train.config import LoraConfig, replace  # noqa: E402

METHODS = ("sft", "rm", "kto", "grpo", "rloo", "ppo", "distill")


def _rank(rank: int, out: str, tiny: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    torch.set_num_threads(1)
    assets = {"base": Path(tiny) / "base", "data": Path(tiny) / "data"}
    jobs = [(m, "fsdp") for m in METHODS] + [(m, "replicate") for m in ("grpo", "rloo", "ppo", "distill")]
    for method, strategy in jobs:
        cfg = method_config(method, assets, Path(out) / f"{method}-{strategy}", 3, log_every=1, strategy=strategy)
        RUNS[method](replace(cfg, lora=LoraConfig(r=4, alpha=8)))
    # DPO's reference precomputed through the adapters-off model before any trained forward, in bf16
    cfg = method_config("dpo", assets, Path(out) / "dpo-bf16-fsdp", 3, log_every=1, strategy="fsdp", dtype="bf16")
    RUNS["dpo"](replace(cfg, lora=LoraConfig(r=4, alpha=8)))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"done": True}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    teacher_folder({"base": Path(sys.argv[2]) / "base"})  # distillation's teacher, before the ranks start
    mp.spawn(_rank, args=tuple(sys.argv[1:3]), nprocs=2, join=True)
