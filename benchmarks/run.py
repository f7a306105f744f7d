"""rlhfkit benchmarks, as ../shared/docs/BENCHMARK.md fixes them. Prints one JSON line on stdout.

    python benchmarks/run.py METHOD [--model DIR] [--tokenizer DIR] [--rm DIR] [--data DIR] [--steps N] [--warmup N]

METHOD: ceiling, sft (later issues add rm, dpo, grpo, ppo, generate). Without --model/--data the
embedded tiny default is built at the reference shape (Qwen2, hidden 256, 4 layers, 4 heads,
intermediate 1024, untied embeddings; our character tokenizer, vocab 103 instead of 1024).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)

from rlhfkit.data.encode import collate_sft, encode_sft  # noqa: E402
from rlhfkit.data.rows import read_rows  # noqa: E402
from rlhfkit.methods.common import load_policy  # noqa: E402
from rlhfkit.methods.sft import sft_objective  # noqa: E402
from rlhfkit.models.tiny import TinySpec, write_tiny_default  # noqa: E402
from rlhfkit.train.dist import DistInfo  # noqa: E402
from rlhfkit.train.optim import build_optimizer, build_scheduler, optimizer_step  # noqa: E402

REFERENCE = TinySpec(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, tie_embeddings=False)
SETTINGS = {"dtype": "fp32", "threads": 2, "lr": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def assets(args) -> dict:
    """Paths of model, tokenizer and data: the flags, or the tiny default built in a temp folder."""
    if args.model and args.data:
        return {"model": args.model, "tokenizer": args.tokenizer, "data": Path(args.data), "rm": args.rm}
    root = Path(tempfile.mkdtemp(prefix="rlhfkit-bench-"))
    paths = write_tiny_default(root, REFERENCE, seed=0)
    data = paths["data"]
    for src, dst in (("sft_train", "sft"), ("prefs_train", "prefs"), ("prompts_train", "prompts")):
        (data / f"{dst}.jsonl").write_text((data / f"{src}.jsonl").read_text())
    return {"model": str(paths["base"]), "tokenizer": args.tokenizer or str(paths["tokenizer"]),
            "data": data, "rm": args.rm}


def non_embedding_params(model) -> int:
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def timed_steps(step_fn, warmup: int, steps: int) -> tuple[list[float], list]:
    times, outputs = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = step_fn(i)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            outputs.append(out)
    return times, outputs


def report(method: str, times: list[float], losses: list[float], train_tokens: float, nograd_tokens: float,
           model, extra: dict) -> dict:
    sec = statistics.median(times)
    flops = 6 * non_embedding_params(model) * train_tokens + 2 * sum(p.numel() for p in model.parameters()) * nograd_tokens
    return {"method": method, "library": "rlhfkit", "sec_per_step": round(sec, 5),
            "sec_per_step_min": round(min(times), 5), "sec_per_step_max": round(max(times), 5),
            "tokens_per_s": round(train_tokens / sec, 1), "model_gflops_per_s": round(flops / sec / 1e9, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "first_loss": losses[0], "last_loss": losses[-1], "steps": len(times), **extra,
            "settings": SETTINGS}


def bench_sft(args) -> dict:
    paths = assets(args)
    model, tokenizer = load_policy(paths["model"], paths["tokenizer"])
    examples, _ = encode_sft(read_rows(paths["data"] / "sft.jsonl"), tokenizer, 128, overlong="truncate")
    objective = sft_objective()
    optimizer = build_optimizer(model, SETTINGS["lr"])
    scheduler = build_scheduler(optimizer, 10**9, 0, "constant")
    batch_size, tokens = 16, []

    def step(i: int) -> float:
        batch = collate_sft(examples[(i * batch_size) % len(examples):][:batch_size], tokenizer.pad_token_id)
        loss, _ = objective.loss(model, batch, objective.counts(batch))
        loss.backward()
        optimizer_step(model, optimizer, scheduler, SETTINGS["max_grad_norm"], DistInfo(), i)
        tokens.append(int(batch.attention_mask.sum()))
        return loss.item()

    times, losses = timed_steps(step, args.warmup, args.steps)
    return report("sft", times, losses, statistics.mean(tokens[args.warmup:]), 0, model,
                  {"batch_sequences": batch_size, "max_length": 128})


def bench_ceiling(args) -> dict:
    """fp32 matmul rate on 2 threads for the reference model's shapes (2048 tokens of a step)."""
    h, inter, tokens = REFERENCE.hidden_size, REFERENCE.intermediate_size, 2048
    shapes = {"qkvo": (tokens, h, h), "mlp_up": (tokens, h, inter), "mlp_down": (tokens, inter, h)}
    result = {"method": "ceiling", "threads": torch.get_num_threads()}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            torch.mm(a, b)
        reps, start = 20, time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        result[f"{name}_gflops_per_s"] = round(2 * m * k * n * reps / (time.perf_counter() - start) / 1e9, 1)
    result["mm_gflops_per_s"] = max(v for k, v in result.items() if k.endswith("_gflops_per_s"))
    result["cpu_flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if _has_cpu_flag(f))
    return result


def _has_cpu_flag(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


BENCHES = {"sft": bench_sft, "ceiling": bench_ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(BENCHES))
    parser.add_argument("--model")
    parser.add_argument("--tokenizer")
    parser.add_argument("--rm")
    parser.add_argument("--data")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(BENCHES[args.method](args)), flush=True)


if __name__ == "__main__":
    main()
