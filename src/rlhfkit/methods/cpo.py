"""CPO (Xu et al. 2024, "Contrastive Preference Optimization", eq. 7) and SimPO (Meng et al. 2024,
"SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6): preference
optimization with no reference model, on the policy's own log-probs (TRL's CPOTrainer).

    CPO:   L = -log sigma( beta log pi(y_w|x) - beta log pi(y_l|x) ) + alpha NLL(y_w|x)
    SimPO: L = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

alpha is ``rpo_alpha`` (TRL's ``cpo_alpha``), the chosen answers' NLL per token over the batch as
TRL's CPOTrainer takes it; SimPO is ``loss_type=simpo`` with ``simpo_gamma`` (SimPO's paper trains
without the NLL: ``rpo_alpha=0``). AlphaPO (Gupta et al. 2025; TRL's ``alpha``) is SimPO with
``alphapo_alpha``: each mean log-prob a read as (1 - e^(-alpha a)) / alpha (losses/dpo.py). TRL's other CPO forms are DPO's on log-probs: ``hinge``
(max(0, 1 - beta h)) and ``ipo`` (per token, as TRL's).

It is DPO's loop (methods/dpo.py) with ``reference=none``: no reference is loaded, copied or
precomputed, and every form of losses/dpo.py reads log pi(y|x) where DPO reads log(pi / pi_ref).
CPOConfig only changes defaults, to TRL's CPOConfig's beta, loss_type, cpo_alpha and simpo_gamma (the
learning rate and max_length stay rlhfkit's); every DPO key can be set over them. Without a reference
only the forms on the margin are taken (losses/dpo.py ``ON_THE_MARGIN``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..train.config import TrainConfig
from .dpo import DPOConfig, run_dpo


@dataclass(frozen=True)
class CPOConfig(DPOConfig):
    model: str = ""  # the model to align, an SFT model as a rule (there is no reference model)
    reference: str = "none"  # no reference model: the forms read log pi itself
    rpo_alpha: float = 1.0  # CPO's alpha (TRL's cpo_alpha): the chosen answers' NLL per token; SimPO's paper uses 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/cpo"))


run_cpo = run_dpo  # one loop: the config says there is no reference
