"""GPU check for the vllm rollout backend: GRPO for a few steps on a small Hugging Face model,
with ``rollout.backend`` = generate (transformers) and vllm, each with and without LoRA. One JSON
line per run: s/step, generation tokens/s, peak GPU memory (PyTorch's allocator, and the device's
own used-memory reading, which also sees vLLM's pool), the mean |engine - policy| log-prob gap.

    python benchmarks/vllm_check.py [--steps 5] [--backends generate,vllm] [--hidden 512 --layers 8]

The model is a Qwen2 built locally (nothing is downloaded) with the benchmark's BPE tokenizer;
it is untrained, so rewards are noise: this measures speed and memory, not learning. On a machine
without a GPU or vLLM, run it with ``--backends sampler,generate`` to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from run import bpe_tokenizer  # noqa: E402

from rlhfkit.data.rows import read_rows  # noqa: E402
from rlhfkit.methods.grpo import GRPOConfig, run_grpo  # noqa: E402
from rlhfkit.tasks.arithmetic_files import write_task_files  # noqa: E402
from rlhfkit.train.config import LoraConfig, RolloutConfig, TrainConfig  # noqa: E402
from rlhfkit.train.logging import read_metrics  # noqa: E402


def build_model(root: Path, hidden: int, layers: int) -> tuple[str, str]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    files = write_task_files(root / "data", seed=0)
    rows = [r.data for r in read_rows(files["sft_train"])]
    tokenizer = bpe_tokenizer([r["prompt"] + r["completion"] for r in rows])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(root / "base"))
    tokenizer.save_pretrained(str(root / "base"))
    return str(root / "base"), str(files["prompts_train"])


def one_run(model: str, prompts: str, backend: str, lora: bool, steps: int, out: Path) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = GRPOConfig(model=model, train_data=prompts, rewards="contains_answer", group_size=8, prompts_per_step=16,
                     max_new_tokens=64, beta=0.04, mu=2, rollout=RolloutConfig(backend=backend),
                     lora=LoraConfig(r=16, alpha=32) if lora else LoraConfig(),
                     train=TrainConfig(out_dir=str(out), max_steps=steps, lr=1e-5, log_every=1, progress=False,
                                       report_to="none", dtype="bf16" if device == "cuda" else "fp32"))
    start = time.time()
    run_grpo(cfg)
    wall = time.time() - start
    logs = [m for m in read_metrics(out) if "train/loss" in m][1:]  # the first step starts the engine
    mean = lambda key: sum(m[key] for m in logs) / max(len(logs), 1)  # noqa: E731
    result = {"backend": backend, "lora": lora, "steps": steps, "s_per_step": round(wall / steps, 3),
              "gen_tokens_per_s": round(mean("train/tokens_sampled_per_s"), 1),
              "generation_s_per_step": round(mean("train/time_generation_s"), 4),
              "weight_sync_s_per_step": round(mean("train/time_weight_sync_s"), 4),
              "logprob_gap": round(mean("train/logprob_gap"), 5), "device": device}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        result.update(peak_torch_allocated_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      device_used_gb_at_end=round((total - free) / 2**30, 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", default="generate,vllm")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlhfkit-vllm-check-"))
    model, prompts = build_model(root, args.hidden, args.layers)
    for backend in args.backends.split(","):
        for lora in (False, True):
            try:
                result = one_run(model, prompts, backend, lora, args.steps, root / f"{backend}-{lora}")
            except Exception as e:  # one failing combination must not hide the others' numbers
                result = {"backend": backend, "lora": lora, "error": f"{type(e).__name__}: {e}"[:500]}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
