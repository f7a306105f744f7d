"""rlhfkit: align language models with human feedback (SFT, reward models, PPO, DPO, GRPO).

Layers, each importing only the ones above it in this list:
    losses   pure tensor maths, one module per method
    data     row formats, validation, tokenisation and collation, the synthetic task
    models   loading and saving Hugging Face folders, the tiny default
    rollout  sampling and scoring
    train    the shared machinery: optimizer step, checkpoints, logging, distributed set-up
    methods  one file per method (sft, rm, dpo, grpo, ppo)
    cli      the `rlhfkit` command
"""

__version__ = "0.1.0"
