"""Side-by-side reference: TRL 1.12's PPOTrainer (trl.experimental.ppo) on the work of `run.py ppo`.

TRL removed PPO in 1.13, so this needs TRL 1.12 in its own environment (torch==2.13.0 first so
that pip keeps the CPU build):

    python -m venv /tmp/trl112 && /tmp/trl112/bin/pip install torch==2.13.0
    /tmp/trl112/bin/pip install trl==1.12.0 torch==2.13.0 && /tmp/trl112/bin/pip install --no-deps -e .
    /tmp/trl112/bin/python benchmarks/trl_ppo.py    # or: python benchmarks/compare.py ppo --trl-ppo-python ...

Same assets as `run.py ppo` (reference-like Qwen2, BPE tokenizer, a reward model made from the
base with a seeded fresh score head, the critic a second copy of it, the reference a frozen copy
of the policy); 32 prompts -> 32 completions of at most 16 tokens (EOS stops), 1 epoch,
1 minibatch, KL coefficient 0.05, lr 1e-5 constant. Seconds per step are the time between
consecutive ``on_step_end`` callbacks (one whole rollout + update each); the first steps are
warm-up.
"""

from trl_common import report, rows, setup  # first: it sets the threads before torch loads

# isort: split
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast
from trl.experimental.ppo import PPOConfig, PPOTrainer


def main() -> None:
    args, paths, _, timer, common = setup("ppo")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"], padding_side="left")
    rm_dir = tempfile.mkdtemp(prefix="trl-bench-rm-")
    torch.manual_seed(0)  # run.py seeds the fresh score head the same way (load_reward_model, seed 0)
    AutoModelForSequenceClassification.from_pretrained(paths["model"], num_labels=1,
                                                       pad_token_id=tokenizer.pad_token_id).save_pretrained(rm_dir)
    policy = AutoModelForCausalLM.from_pretrained(paths["model"])
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    data = rows(paths, "prompts.jsonl", 32 * (args.steps + args.warmup + args.profile))
    dataset = datasets.Dataset.from_list([{"input_ids": tokenizer(r["prompt"])["input_ids"]} for r in data])
    common.update(output_dir=str(Path(paths["model"]).parent / "trl_ppo_out"), max_steps=-1)
    config = PPOConfig(**common, per_device_train_batch_size=32, num_mini_batches=1, num_ppo_epochs=1,
                       response_length=16, stop_token="eos", kl_coef=0.05, total_episodes=len(data),
                       local_rollout_forward_batch_size=32, num_sample_generations=0)
    PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
               value_model=value, train_dataset=dataset, callbacks=[timer]).train()
    report("ppo", args, timer)


if __name__ == "__main__":
    main()
