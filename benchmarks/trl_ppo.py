"""Side-by-side reference: TRL 1.12's PPOTrainer (trl.experimental.ppo) on the work of `run.py ppo`.

TRL removed PPO in 1.13, so this needs TRL 1.12 in its own environment (torch==2.13.0 first so
that pip keeps the CPU build):

    python -m venv /tmp/trl112 && /tmp/trl112/bin/pip install torch==2.13.0
    /tmp/trl112/bin/pip install trl==1.12.0 torch==2.13.0 && /tmp/trl112/bin/pip install --no-deps -e .
    /tmp/trl112/bin/python benchmarks/trl_ppo.py

Same assets as `run.py ppo` (reference-like Qwen2, BPE tokenizer, a reward model made from the
base with a seeded fresh score head, the critic a second copy of it, the reference a frozen copy
of the policy); 32 prompts -> 32 completions of at most 16 tokens (EOS stops), 1 epoch,
1 minibatch, KL coefficient 0.05, lr 1e-5 constant. Seconds per step are the time between
consecutive ``on_step_end`` callbacks (one whole rollout + update each); the first steps are
warm-up. Run it right after `python benchmarks/run.py ppo` and compare the medians.
"""

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RLHFKIT_FAST_LINEAR"] = "0"  # TRL's models stay plain transformers models

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.last = [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def main(steps: int = 20, warmup: int = 2) -> None:
    class Args:
        model = data = tokenizer = rm = None

    paths = run.assets(Args)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"], padding_side="left")
    rm_dir = tempfile.mkdtemp(prefix="trl-bench-rm-")
    torch.manual_seed(0)  # run.py seeds the fresh score head the same way (load_reward_model, seed 0)
    AutoModelForSequenceClassification.from_pretrained(paths["model"], num_labels=1,
                                                       pad_token_id=tokenizer.pad_token_id).save_pretrained(rm_dir)
    policy = AutoModelForCausalLM.from_pretrained(paths["model"])
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    n = 32 * (steps + warmup + 1)
    rows = [r.data for r in run.read_rows(paths["data"] / "prompts.jsonl")][:n]
    dataset = datasets.Dataset.from_list([{"input_ids": tokenizer(r["prompt"])["input_ids"]} for r in rows])
    timer = StepTimer()
    config = PPOConfig(output_dir=str(Path(paths["model"]).parent / "trl_ppo_out"), per_device_train_batch_size=32,
                       num_mini_batches=1, num_ppo_epochs=1, response_length=16, stop_token="eos", kl_coef=0.05,
                       learning_rate=1e-5, lr_scheduler_type="constant", total_episodes=len(rows),
                       local_rollout_forward_batch_size=32, num_sample_generations=0, report_to="none", use_cpu=True,
                       save_strategy="no", weight_decay=0.0, seed=0, logging_steps=1, max_grad_norm=1.0)
    PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
               value_model=value, train_dataset=dataset, callbacks=[timer]).train()
    timed = timer.times[warmup:]
    print(json.dumps({"method": "ppo", "library": "trl-1.12", "sec_per_step": round(statistics.median(timed), 5),
                      "sec_per_step_min": round(min(timed), 5), "sec_per_step_max": round(max(timed), 5),
                      "steps": len(timed),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
