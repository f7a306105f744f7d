"""RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs"): REINFORCE on whole answers, k samples a prompt, each
answer's baseline the mean reward of the other k - 1, the KL to the reference in the reward.

    R_i = r_i - beta sum_t ( log pi_old(o_it) - log pi_ref(o_it) )
    A_i = R_i - 1/(k-1) sum_{j != i} R_j
    L   = 1/G sum_i -min( s_i A_i, clip(s_i, 1-eps, 1+eps) A_i ),   s_i = pi_theta(o_i|q) / pi_old(o_i|q)

(the clip is TRL's, for mu > 1 or minibatches; at s_i = 1 it is the paper's estimator).

It is GRPO's loop (methods/grpo.py) with other defaults: the same keys, rollout backends, rewards,
minibatches and checks, its advantages from losses/grpo.py's ``loo_advantages``. RLOOConfig only
changes defaults, to those of TRL's RLOOTrainer; every GRPO key can be set over them (loss_type=grpo
takes token ratios and a token mean, as veRL's and OpenRLHF's RLOO).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..train.config import TrainConfig
from .grpo import GRPOConfig, run_grpo


@dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    advantage_estimator: str = "rloo"
    scale_rewards: str = "none"  # leave-one-out differences, not divided by a std (normalize_advantages: over the batch)
    loss_type: str = "rloo"
    importance_sampling_level: str = "sequence"
    beta: float = 0.05  # TRL's RLOO default; the KL is in the reward
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/rloo"))


run_rloo = run_grpo  # one loop: the config says which advantages
