"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
eqs. 4-7): supervised fine-tuning and preference alignment in one loss, with no reference model
(TRL's ORPOTrainer).

    L = NLL(y_w|x) + lambda L_OR,   L_OR = -log sigma( log odds(y_w|x) - log odds(y_l|x) )
    odds(y|x) = P(y|x) / (1 - P(y|x)),   P(y|x) = exp( 1/|y| sum_t log pi(y_t | x, y_<t) )

lambda is ``beta`` (TRL's name, its default 0.1), L_OR is losses/dpo.py's ``orpo`` form, and the
NLL is ``rpo_alpha`` x the chosen answers' NLL per token over the batch (weight 1, the paper's;
the mean over the batch's tokens is TRL's and the paper's code's, the paper writes one per answer).
The NLL is over the answers' tokens, the paper's L_SFT of y_w given x; TRL's ORPOTrainer and the
paper's code (by default) count the prompt's tokens too.

It is DPO's loop (methods/dpo.py) with ``reference=none``; ORPOConfig only changes defaults, to
TRL's ORPOConfig's beta (the learning rate and max_length stay rlhfkit's). The rewards it logs
(and the held-out preference accuracy) are beta times each answer's mean log-prob, as TRL logs
them, beside TRL's ``log_odds_chosen`` and ``log_odds_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..train.config import TrainConfig
from .dpo import DPOConfig, run_dpo


@dataclass(frozen=True)
class ORPOConfig(DPOConfig):
    model: str = ""  # the model to align: ORPO needs no SFT stage before it (a base model will do)
    beta: float = 0.1  # lambda: the odds-ratio term's weight (TRL's beta)
    loss_type: str = "orpo"  # the odds-ratio term (another form of losses/dpo.py may be weighed with it)
    reference: str = "none"  # no reference model
    rpo_alpha: float = 1.0  # the chosen answers' NLL per token: ORPO's L_SFT, weight 1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/orpo"))


run_orpo = run_dpo  # one loop: the config says which form
