"""rlhfkit: align language models with human feedback (SFT, reward models, PPO, DPO, CPO, SimPO,
ORPO, online DPO, KTO, GRPO, RLOO, PRMs, on-policy distillation).

    from rlhfkit import SFTConfig, TrainConfig, run_sft
    run_sft(SFTConfig(model="tiny/base", train_data="sft.jsonl", train=TrainConfig(epochs=1)))

Every method's config and ``run_*`` function, the shared configs, the pure losses, the shipped
rewards and the plotting helper are importable from here; they load on first use, so
``import rlhfkit`` (and ``rlhfkit --help``) stays fast.

Layers, each importing only the ones above it in this list:
    losses   pure tensor maths, one module per method
    data     row formats, validation, tokenisation and collation
    tasks    what a held-out answer is checked against, and the rewards a task ships
    models   loading and saving Hugging Face folders, the tiny default, model cards
    rollout  sampling and scoring
    train    the shared machinery: run skeleton, optimizer step, checkpoints, logging, plots
    methods  one file per method (sft, rm, dpo, cpo, orpo, online_dpo, kto, grpo, rloo, ppo, prm, distill)
    cli      the `rlhfkit` command
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "rlhfkit.methods.sft": ("SFTConfig", "run_sft"),
    "rlhfkit.methods.rm": ("RMConfig", "run_rm"),
    "rlhfkit.methods.dpo": ("DPOConfig", "run_dpo"),
    "rlhfkit.methods.cpo": ("CPOConfig", "run_cpo"),
    "rlhfkit.methods.orpo": ("ORPOConfig", "run_orpo"),
    "rlhfkit.methods.online_dpo": ("OnlineDPOConfig", "run_online_dpo"),
    "rlhfkit.methods.kto": ("KTOConfig", "run_kto"),
    "rlhfkit.methods.grpo": ("GRPOConfig", "run_grpo"),
    "rlhfkit.methods.rloo": ("RLOOConfig", "run_rloo"),
    "rlhfkit.methods.ppo": ("PPOConfig", "run_ppo"),
    "rlhfkit.methods.prm": ("PRMConfig", "run_prm"),
    "rlhfkit.methods.distill": ("DistillConfig", "run_distill"),
    "rlhfkit.train.config": ("TrainConfig", "LoraConfig", "RolloutConfig", "ConfigError", "load_config"),
    "rlhfkit.train.plots": ("plot_runs",),
    "rlhfkit.models.tiny": ("write_tiny_default",),
    "rlhfkit.losses.sft": ("sft_loss",),
    "rlhfkit.losses.rm": ("ranking_loss",),
    "rlhfkit.losses.dpo": ("dpo_loss", "plackett_luce_loss"),
    "rlhfkit.losses.kto": ("kto_loss",),
    "rlhfkit.losses.distill": ("generalized_jsd", "distill_loss"),
    "rlhfkit.losses.grpo": ("grpo_loss", "group_advantages", "loo_advantages", "process_advantages",
                           "k3_kl"),
    "rlhfkit.losses.prm": ("step_bce_loss", "step_logit"),
    "rlhfkit.losses.ppo": ("gae", "policy_loss", "value_loss", "kl_penalty_rewards", "AdaptiveKL"),
    "rlhfkit.tasks.arithmetic": ("exact_answer", "contains_answer", "arithmetic_steps"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rlhfkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
