"""One file per method, each reading top to bottom: sft, rm, dpo, grpo, ppo."""
