"""Memory per rank under train.strategy=fsdp at 1 and 2 ranks, one JSON line per method and rank count.

    python benchmarks/memory.py [--ranks 1 2] [--methods sft rm dpo grpo ppo] [--device cpu]

Reference-like assets (benchmarks/run.py: Qwen2 hidden 256, 4 layers, untied, 4.7M parameters)
unless --model/--tokenizer/--data are given. Each (method, ranks) runs 2 steps in fresh gloo
processes and reports, per rank: the bytes of trained parameters + their gradients + optimizer
state held at the first step (``Run.resident_bytes``: local shards under FSDP2), and the peak RSS
(on CUDA also the peak GPU memory), the last step's seconds and the first and last loss.
``--device cuda --dtype bf16 --strategy replicate|fsdp`` is the GPU check (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from run import assets  # noqa: E402


def method_config(method: str, paths: dict, out: str, device: str, strategy: str = "fsdp", dtype: str = "fp32"):
    from rlhfkit.methods.dpo import DPOConfig
    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.methods.ppo import PPOConfig
    from rlhfkit.methods.rm import RMConfig
    from rlhfkit.methods.sft import SFTConfig
    from rlhfkit.train.config import TrainConfig

    data, model, tok = Path(paths["data"]), paths["model"], paths["tokenizer"]
    common = dict(out_dir=out, max_steps=3, strategy=strategy, device=device, dtype=dtype, progress=False,
                  report_to="none", log_every=1, lr=1e-5, schedule="constant")
    offline = TrainConfig(batch_size=32, **common)
    online = TrainConfig(**common)
    configs = {
        "sft": lambda: SFTConfig(model=model, tokenizer=tok, train_data=str(data / "sft.jsonl"), max_length=64,
                                 train=offline),
        "rm": lambda: RMConfig(model=model, tokenizer=tok, train_data=str(data / "prefs.jsonl"), max_length=64,
                               train=offline),
        "dpo": lambda: DPOConfig(model=model, tokenizer=tok, train_data=str(data / "prefs.jsonl"), max_length=64,
                                 reference="forward", train=offline),
        "grpo": lambda: GRPOConfig(model=model, tokenizer=tok, train_data=str(data / "prompts.jsonl"), group_size=4,
                                   prompts_per_step=8, rewards="contains_answer", train=online),
        "ppo": lambda: PPOConfig(model=model, tokenizer=tok, reward_model=_reward_folder(model, tok), critic=model,
                                 prompts_per_step=32,
                                 minibatch_size=32, ppo_epochs=1, train_data=str(data / "prompts.jsonl"),
                                 train=online),
    }
    return configs[method]()


def _reward_folder(model: str, tok: str) -> str:
    """A reward-model folder made from ``model`` (a seeded, untrained score head): PPO refuses a causal LM."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model

    folder = Path(f"{model}-reward")
    if not (folder / "config.json").is_file():
        load_reward_model(model, load_tokenizer(model, tok)).save_pretrained(str(folder))
    return str(folder)


def _small_data(paths: dict) -> None:
    """Encoding 11k rows per run would dominate: keep 512 of each file."""
    for name in ("sft", "prefs", "prompts"):
        path = Path(paths["data"]) / f"{name}.jsonl"
        path.write_text("\n".join(path.read_text().splitlines()[:512]) + "\n")


def _rank(rank: int, world: int, method: str, paths: dict, out: str, device: str, strategy: str, dtype: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    if world > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{out}/pg", rank=rank, world_size=world)
    torch.set_num_threads(max(1, 2 // world))
    import rlhfkit.train.run as run_module
    from rlhfkit.methods.dpo import run_dpo
    from rlhfkit.methods.grpo import run_grpo
    from rlhfkit.methods.ppo import run_ppo
    from rlhfkit.methods.rm import run_rm
    from rlhfkit.methods.sft import run_sft

    seen, original = {}, run_module.Run.step_done

    def measuring(self, *args, **kwargs):
        seen.setdefault("resident", self.resident_bytes())
        seen.setdefault("times", []).append(time.perf_counter())
        return original(self, *args, **kwargs)

    run_module.Run.step_done = measuring
    runs = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "grpo": run_grpo, "ppo": run_ppo}
    runs[method](method_config(method, paths, f"{out}/run", device, strategy, dtype))
    losses = [json.loads(line).get("train/loss") for line in Path(f"{out}/run/metrics.jsonl").read_text().splitlines()]
    result = {"method": method, "ranks": world, "rank": rank, "strategy": strategy, "device": device, "dtype": dtype,
              "loss_first": losses[0], "loss_last": losses[-1],
              "param_grad_optim_mb": round(seen["resident"] / 2**20, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "sec_per_step": round(seen["times"][-1] - seen["times"][-2], 3)}
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["sft", "rm", "dpo", "grpo", "ppo"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--strategy", default="fsdp", choices=["fsdp", "replicate"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--model")
    parser.add_argument("--tokenizer")
    parser.add_argument("--data")
    parser.add_argument("--rm")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    paths = assets(args)
    if not args.data:
        _small_data(paths)
    if "ppo" in args.methods:
        _reward_folder(str(paths["model"]), paths["tokenizer"] and str(paths["tokenizer"]))  # once, before the ranks
    paths = {k: (str(v) if v is not None else None) for k, v in paths.items()}
    for method in args.methods:
        for world in args.ranks:
            out = tempfile.mkdtemp(prefix=f"rlhfkit-mem-{method}-{world}-")
            mp.spawn(_rank, args=(world, method, paths, out, args.device, args.strategy, args.dtype), nprocs=world,
                     join=True)
            for rank in range(world):
                print(Path(f"{out}/rank{rank}.json").read_text(), flush=True)


if __name__ == "__main__":
    main()
