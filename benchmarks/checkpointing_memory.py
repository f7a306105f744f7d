"""Activation checkpointing's memory effect: peak RSS of SFT steps on long sequences, on and off.

    python benchmarks/checkpointing_memory.py [--batch 8] [--seq 512] [--steps 3]

The reference-like Qwen2 of benchmarks/run.py (hidden 256, 4 layers, untied, 4.7M parameters),
random token sequences, the SFT loss on every token, AdamW; each setting in a fresh process (peak
RSS is per process). One JSON line per setting, then the ratio. The benchmark's own ~13-token
rows hold too few activations for checkpointing to show: this is where it does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")


def one(batch: int, seq: int, steps: int, checkpointing: bool) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhfkit.losses.sft import sft_loss
    from rlhfkit.models.forward import token_logprobs
    from rlhfkit.models.kernels import use_fast_linear
    from rlhfkit.models.lora import enable_activation_checkpointing

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         max_position_embeddings=seq, attn_implementation="eager")
    model = Qwen2ForCausalLM(config)
    use_fast_linear(model)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, 1024, (batch, seq))
    mask = torch.ones_like(ids)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        logprobs = token_logprobs(model, ids, mask, mask)
        loss, _ = sft_loss(logprobs, mask, float(mask[:, 1:].sum()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"activation_checkpointing": checkpointing, "batch": batch, "seq": seq,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_steps_mb": round(baseline, 1), "sec_per_step": round(sorted(times)[len(times) // 2], 3),
            "losses": [round(x, 6) for x in losses]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", choices=("on", "off"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.batch, args.seq, args.steps, args.one == "on")), flush=True)
        return
    results = {}
    for flag in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--one", flag, "--batch", str(args.batch), "--seq",
                              str(args.seq), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results[flag] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[flag]), flush=True)
    off, on = results["off"], results["on"]
    print(json.dumps({"peak_rss_saved_mb": round(off["peak_rss_mb"] - on["peak_rss_mb"], 1),
                      "step_time_ratio_on_off": round(on["sec_per_step"] / off["sec_per_step"], 2),
                      "same_losses": off["losses"] == on["losses"]}), flush=True)


if __name__ == "__main__":
    main()
