"""GRPO (DeepSeekMath): G samples per prompt, group-relative advantages, no critic.

Reads top to bottom, one rollout step at a time: the rollout backend samples G completions
per prompt from pi_old -> the rewards score them (outcome, or per step for process rewards)
-> group advantages (RLOO's: the KL in the reward, then leave-one-out, ``rloo_advantages``) ->
mu policy updates on the same samples with the clipped, k3-regularised loss of losses/grpo.py
(RLOO's: no KL term). methods/rloo.py is this loop with RLOO's defaults. The run skeleton (train/run.py) does set-up, checks and cadence;
online_rewards.py resolves the rewards the config names, grpo_batch.py holds the batch's filters
and DAPO's dynamic sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch

from ..data.encode import row_chunks
from ..losses.grpo import (
    REDUCTIONS,
    SAMPLING_CORRECTIONS,
    decoupled_advantages,
    group_advantages,
    grpo_loss,
    loo_advantages,
    off_policy_keep,
    overlong_penalty,
    process_advantages,
    sampling_weights,
    sequence_k1,
)
from ..models.forward import router_balance
from ..models.load import load_causal_lm, load_tokenizer
from ..models.reward import is_likelihood_prm, is_token_classifier
from ..rollout.backend import SamplingParams, make_backend
from ..rollout.evaluate import row_prompt_ids
from ..rollout.rewards import call_reward
from ..rollout.sampler import Samples, completion_logprobs
from ..tasks import PROCESS_REWARDS, TASK_CHOICES
from ..train.balance import balanced_groups
from ..train.config import (
    ConfigError,
    LoraConfig,
    RolloutConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    check_reference_sync,
    check_sampling_correction,
    choice,
    positive,
    used_only_with,
    within,
)
from ..train.loop import BatchOrder, autocast, reduce_dict
from ..train.optim import build_optimizer, build_scheduler
from ..train.run import Run, start_run
from .common import (
    OFFLINE_BATCH,
    accuracy_eval,
    check_positions,
    chunked_logprobs,
    frozen_reference,
    longest_prompt,
    reference_sync,
    refuse_offline_batch_fields,
    say_foreign_ids,
    say_generation_config,
    trainer_logprobs,
)
from .grpo_batch import (
    Rollout,
    all_abstained,
    dynamic_batch,
    has_signal,
    high_entropy,
    informative,
    keep_informative_groups,
    keep_rows,
    more_prompts,
    normalised_over_batch,
    scaled_by_batch,
    step_metrics,
)
from .online_rewards import (
    RewardErrors,
    RewardKeys,
    Rewards,
    bind,
    check_learned_rewards,
    load_model_rewards,
    model_folder,
    parse_rewards,
    prompt_rows,
    recorded_config,
    refuse_recorded_callable,
    replaced_rewards,
    resolve_rewards,
    score_samples,
)


@dataclass(frozen=True)
class GRPOConfig:
    UNREAD = OFFLINE_BATCH  # not a field: keys a config file or override may not set
    model: str = ""  # the SFT model
    tokenizer: str | None = None
    train_data: str = ""  # prompts (prompt + fields the rewards read, e.g. answer)
    eval_data: str | None = None  # held-out prompts: accuracy of greedy answers (checked by eval_task)
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    rewards: str = "exact_answer"  # "name[:weight],...": shipped (tasks/), rm:PATH, module:function or file.py:function
    process_reward: str | None = None  # a shipped process reward or prm:PATH: PRM advantages instead of ORM
    group_size: int = 8  # G
    prompts_per_step: int = 16  # over all ranks
    max_new_tokens: int = 16
    temperature: float = 1.0  # sampling; pi_theta, pi_old and pi_ref are all of logits / temperature
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.04  # KL weight (in the loss; with advantage_estimator=rloo in the reward); 0 loads no reference
    # TR-DPO's reference sync (TRL's GRPO names): after every ref_model_sync_steps-th optimizer step the KL's
    # reference becomes ref_model_mixup_alpha x the policy + (1 - alpha) x itself
    sync_ref_model: bool = False  # TR-DPO's reference sync of the KL's reference (beta > 0, no LoRA)
    ref_model_mixup_alpha: float = 0.6  # alpha in (0, 1]: the policy's share of the new reference (1: a copy)
    ref_model_sync_steps: int = 512  # tau: a sync after every tau-th optimizer step (TRL's global_step)
    eps_low: float = 0.2
    eps_high: float | None = None  # DAPO clip-higher; None = eps_low
    delta: float | None = None  # two-sided clipping (INTELLECT-2; TRL's name): the ratio's cap where A < 0
    mu: int = 1  # passes over each batch of samples (TRL's num_iterations)
    # prompts (each with its G answers) per optimizer step, over all ranks; None: the whole batch, one step a
    # pass (TRL's default); fewer: prompts_per_step / minibatch_size steps a pass (TRL's steps_per_generation)
    minibatch_size: int | None = None
    share_prompt: bool = True  # forward each prompt once for its G samples (block mask; SDPA attention only)
    # grpo (paper) | dapo (token mean) | dr_grpo (constant normaliser) | cispo (MiniMax-M1) | sapo (soft gate)
    # | luspo (GSPO weighted by length; importance_sampling_level=sequence) | rloo (TRL's RLOO: each answer's
    # whole ratio, clipped, a mean over answers; importance_sampling_level=sequence) | vespo (a Gamma weight of
    # each answer's whole ratio; losses/policy.py)
    loss_type: str = "grpo"
    sapo_temperature_pos: float = 1.0  # loss_type=sapo: the gate's tau where A > 0 (TRL's name and default)
    sapo_temperature_neg: float = 1.05  # loss_type=sapo: the gate's tau elsewhere
    # loss_type=vespo: phi(w) = e^lambda w^k e^(-lambda w) of each answer's whole ratio w (TRL's names and defaults)
    vespo_k_pos: float = 2.0  # k where A >= 0: damps answers whose ratio fell below 1
    vespo_lambda_pos: float = 3.0  # lambda where A >= 0: damps answers whose ratio rose above 1
    vespo_k_neg: float = 3.0  # k where A < 0
    vespo_lambda_neg: float = 2.0  # lambda where A < 0
    # DeepSeek-V3.2's off-policy sequence masking: an answer with A < 0 whose mean log(pi_sampler / pi_theta)
    # exceeds this adds no policy loss (TRL's name; None: off)
    off_policy_mask_threshold: float | None = None
    # the KL term times the importance ratio: DeepSeek-V3.2's unbiased estimate (TRL's name; on by default
    # there; off here: the paper's k3)
    use_bias_correction_kl: bool = False
    entropy_coef: float = 0.0  # > 0: the loss minus this x the answers' mean token entropy (TRL's name)
    # Skywork-OR1's adaptive control of entropy_coef (TRL's names and defaults): after each optimizer step the
    # coefficient moves by entropy_coef_delta, up where the step's mean token entropy is at or below
    # entropy_target and down otherwise, within [entropy_coef_min, entropy_coef_max]; applied only at or below it
    use_adaptive_entropy: bool = False  # entropy_coef then starts the coefficient, moved after each optimizer step
    entropy_coef_min: float = 0.0  # the coefficient's floor
    entropy_coef_max: float = 1.0  # the coefficient's ceiling
    entropy_coef_delta: float = 0.005  # its move a step
    entropy_target: float = 0.2  # nats of mean token entropy at or below which the bonus applies and grows
    # token (the paper's) | sequence (GSPO; TRL's name): with loss_type grpo, sapo, luspo or rloo (which need it)
    importance_sampling_level: str = "token"
    # divide advantages by the std of the group's rewards (the paper's), of the whole batch's (Lite PPO), or
    # not at all (none: Dr. GRPO); TRL's name and values
    scale_rewards: str = "group"
    # grpo: the group's mean as the baseline, scale_rewards' std (the paper's) | rloo: RLOO's, the mean of the
    # group's other answers, with the KL to the reference in the reward (beta x each answer's summed k1 under
    # pi_old) in place of the loss (Ahmadian et al. 2024; TRL's RLOOTrainer, `rlhfkit rloo`; veRL's name)
    advantage_estimator: str = "grpo"
    normalize_advantages: bool = False  # rloo: the advantages centred and scaled over the step's batch (TRL's name)
    # rloo: (low, high), the weighted outcome reward clamped to it before the KL (TRL's RLOO name); None: not
    reward_clip_range: tuple[float, float] | None = None
    # several rewards: sum_then_normalize (their weighted sum, then the advantages above) or normalize_then_sum
    # (GDPO: each normalised in its group, summed, then normalised over the batch); TRL's name and values
    multi_objective_aggregation: str = "sum_then_normalize"
    # beta 0: groups whose advantages are all zero are not forwarded (their loss and gradient are zero; not
    # under fsdp); the update's logged means (entropy, clip fractions, ratio) are then over the forwarded groups
    skip_zero_advantage: bool = True
    dynamic_sampling: bool = False  # DAPO: groups with all-zero advantages are replaced by groups of more prompts
    max_sampling_rounds: int = 4  # dynamic_sampling: rounds of prompts_per_step prompts a step at most; then masked
    # DAPO's overlong filtering (TRL's name): an answer cut off at max_new_tokens adds no loss; it still counts
    # in its group's advantages
    mask_truncated_completions: bool = False
    # < 1: the policy loss of the tokens whose entropy is among the top share of the batch's only (Wang et al.
    # 2025, "Beyond the 80/20 Rule"; TRL's name; the paper's 0.2); the KL term keeps every token
    top_entropy_quantile: float = 1.0
    overlong_buffer: int = 0  # DAPO: reward ramps to -overlong_penalty over the last N of max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # the punishment at max_new_tokens (DAPO: 1)
    reward_errors: str = "raise"  # raise | zero (score 0, count, and say each reward's first error once)
    reward_timeout_s: float = 0.0  # > 0: a reward call that takes longer is an error (named); 0 = no limit
    eval_limit: int = 500  # held-out prompts used; 0 = all
    eval_max_new_tokens: int = 32
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # rollout.backend: sampler | generate | vllm
    # a backend whose log-probs are not the trainer's (vllm, generate): the policy loss weighed by pi_old / pi_sampler,
    # per sequence or token, masked or truncated outside [min, max] (TRL's vllm_importance_sampling_*; none: off)
    sampling_correction: str = "sequence_mask"
    sampling_correction_min: float | None = None  # the weights' lower bound (None: none)
    sampling_correction_max: float | None = 3.0  # the weights' upper bound (TRL's clip_max; None: none)
    lora: LoraConfig = field(default_factory=LoraConfig)  # with adapters the KL reference is the base (adapters off)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/grpo"))

    def __post_init__(self):
        if self.loss_type == "bnpo":
            raise ConfigError("loss_type=bnpo (TRL's token mean over each device's micro-batch) is not here: "
                              "loss_type=dapo is the token mean over the whole batch, which bnpo's is where one "
                              "micro-batch on one device holds the step", keys=["loss_type"])
        choice("loss_type", self.loss_type, tuple(REDUCTIONS))
        choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        if self.importance_sampling_level == "sequence" and self.loss_type not in ("grpo", "luspo", "sapo", "rloo"):
            raise ConfigError(f"importance_sampling_level=sequence (GSPO; RLOO's default) averages over sequences (its "
                              f"eq. 5), which is loss_type=grpo or sapo (or luspo's length-weighted sum, rloo's whole "
                              f"ratio); for loss_type={self.loss_type} set importance_sampling_level=token: it "
                              "would weigh them by their tokens")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ConfigError("loss_type=luspo is GSPO's sequence-level loss weighted by length: set "
                              "importance_sampling_level=sequence (TRL's requirement too)")
        if self.loss_type == "rloo" and self.importance_sampling_level != "sequence":
            raise ConfigError("loss_type=rloo clips each answer's whole ratio pi_theta(y|x) / pi_old(y|x) (TRL's "
                              "RLOOTrainer): set importance_sampling_level=sequence")
        choice("reward_errors", self.reward_errors, ("raise", "zero"))
        if self.scale_rewards in ("true", "false"):
            raise ConfigError(f"config key 'scale_rewards' takes group, batch or none; TRL's {self.scale_rewards} is "
                              f"{'group' if self.scale_rewards == 'true' else 'none'}")
        choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        choice("multi_objective_aggregation", self.multi_objective_aggregation,
               ("sum_then_normalize", "normalize_then_sum"))
        if self.multi_objective_aggregation == "normalize_then_sum":
            clash = [f"{k}={v}" for k, v in (("scale_rewards", self.scale_rewards), ("dynamic_sampling",
                     self.dynamic_sampling), ("process_reward", self.process_reward))
                     if v != getattr(GRPOConfig, k)]
            if clash:
                raise ConfigError(f"multi_objective_aggregation=normalize_then_sum (GDPO) scales each outcome reward in "
                                  f"its group and the sum over the batch; {', '.join(clash)} would change that: "
                                  "leave it at its default")
        within("top_entropy_quantile", self.top_entropy_quantile, 0, 1)  # 0: the highest-entropy token alone
        if self.top_entropy_quantile < 1 and self.importance_sampling_level == "sequence":
            raise ConfigError("top_entropy_quantile is for token ratios: with GSPO's one ratio per answer "
                              "(importance_sampling_level=sequence) TRL's masked losses still reach every token "
                              "through it and rlhfkit's GSPO-token form would not; set one")
        check_sampling_correction(self, SAMPLING_CORRECTIONS)
        choice("advantage_estimator", self.advantage_estimator, ("grpo", "rloo"))
        if self.advantage_estimator == "rloo":
            clash = [f"{k}={v}" for k, v in (("scale_rewards", self.scale_rewards), ("multi_objective_aggregation",
                     self.multi_objective_aggregation), ("dynamic_sampling", self.dynamic_sampling),
                     ("process_reward", self.process_reward), ("use_bias_correction_kl", self.use_bias_correction_kl))
                     if v != {"scale_rewards": "none"}.get(k, getattr(GRPOConfig, k))]
            if clash:
                advice = (" (set scale_rewards=none; normalize_advantages=true scales over the batch, TRL's name)"
                          if self.scale_rewards != "none" else "; leave it at its default")
                raise ConfigError(f"advantage_estimator=rloo takes each answer's outcome reward less the mean of its "
                                  f"group's others, the KL in the reward; {', '.join(clash)} would change that{advice}")
        used_only_with("normalize_advantages", self.normalize_advantages, False, self.advantage_estimator == "rloo",
                       "advantage_estimator=rloo (for grpo: scale_rewards)")
        if self.reward_clip_range is not None:  # TRL's RLOO option (its GRPO has none)
            if not self.reward_clip_range[0] < self.reward_clip_range[1]:
                raise ConfigError(f"config key 'reward_clip_range' must be [low, high] with low < high; got "
                                  f"{list(self.reward_clip_range)}")
            used_only_with("reward_clip_range", self.reward_clip_range, None, self.advantage_estimator == "rloo",
                           "advantage_estimator=rloo (TRL's RLOO option)")
        if self.scale_rewards == "batch" and self.process_reward is not None:
            raise ConfigError("scale_rewards=batch scales outcome advantages; a process reward's step rewards are "
                              "normalised over their group (scale_rewards group or none)")
        choice("eval_task", self.eval_task, TASK_CHOICES)
        if self.process_reward is not None and not self.process_reward.startswith("prm:"):
            refuse_recorded_callable("process_reward", self.process_reward)
            choice("process_reward", self.process_reward, (*PROCESS_REWARDS, "prm:PATH"))
        if self.process_reward is not None and self.process_reward.startswith("prm:"):
            model_folder("process_reward", self.process_reward[4:],
                         lambda p: is_token_classifier(p) or is_likelihood_prm(p),
                         "ForTokenClassification (or likelihood-read PRM)")
        parse_rewards(self.rewards)
        at_least("group_size", self.group_size, 2, " (a group of one has no baseline)")
        for key in ("prompts_per_step", "max_new_tokens", "mu", "eval_max_new_tokens", "max_sampling_rounds"):
            at_least(key, getattr(self, key), 1)
        if self.minibatch_size is not None:
            at_least("minibatch_size", self.minibatch_size, 1)
            if self.prompts_per_step % self.minibatch_size:
                raise ConfigError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of minibatch_size "
                                  f"({self.minibatch_size})")
        for key in ("beta", "top_k", "eval_limit", "reward_timeout_s"):
            at_least(key, getattr(self, key), 0)
        check_reference_sync(self)
        if self.sync_ref_model and self.beta == 0:
            raise ConfigError("sync_ref_model=true moves the KL's reference, and beta=0 has no KL (no reference is "
                              "loaded): set beta > 0, or leave sync_ref_model out", keys=["sync_ref_model", "beta"])
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "eval_task", "train.eval_every"),
                           bool(self.eval_data), "held-out evaluation (eval_data)")
        positive("temperature", self.temperature, " (greedy samples make a group G copies of one answer: no advantage)")
        at_least("overlong_penalty", self.overlong_penalty, 0)
        within("overlong_buffer", self.overlong_buffer, 0, self.max_new_tokens)
        used_only_with("max_sampling_rounds", self.max_sampling_rounds, GRPOConfig.max_sampling_rounds,
                       self.dynamic_sampling, "dynamic_sampling=true")
        used_only_with("overlong_penalty", self.overlong_penalty, GRPOConfig.overlong_penalty,
                       self.overlong_buffer > 0, "overlong_buffer > 0")
        if self.overlong_buffer and self.process_reward is not None:
            raise ConfigError("overlong_buffer shapes the outcome reward, which process_reward replaces; set one")
        within("top_p", self.top_p, 0, 1, open_low=True)
        positive("eps_low", self.eps_low)
        if self.eps_high is not None and not self.eps_high >= self.eps_low:  # NaN too
            raise ConfigError(f"config key 'eps_high' must be >= eps_low ({self.eps_low}); got {self.eps_high}")
        high = 1 + (self.eps_low if self.eps_high is None else self.eps_high)
        if self.delta is not None and self.loss_type in ("cispo", "sapo", "vespo"):
            raise ConfigError(f"delta caps the clipped ratio of the other loss types; {self.loss_type} has no clip "
                              "to cap (cispo clips its weight at 1 + eps_high, sapo gates the ratio smoothly, vespo "
                              "weighs each answer by its whole ratio)")
        at_least("vespo_k_pos", self.vespo_k_pos, 0.0)
        at_least("vespo_k_neg", self.vespo_k_neg, 0.0)
        positive("vespo_lambda_pos", self.vespo_lambda_pos)
        positive("vespo_lambda_neg", self.vespo_lambda_neg)
        for key in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            used_only_with(key, getattr(self, key), getattr(GRPOConfig, key), self.loss_type == "vespo",
                           "loss_type=vespo")
        if self.loss_type == "vespo" and self.sampling_correction.startswith("sequence") \
                and self.rollout.backend != "sampler":  # the sampler in bf16 and the like: refused once it is built
            raise ConfigError(f"loss_type=vespo puts the sampling weights pi_old / pi_sampler into each answer's ratio "
                              f"token by token (TRL's VESPO needs a token mode too); sampling_correction="
                              f"{self.sampling_correction} weighs whole answers: set token_truncate, token_mask or none",
                              keys=["loss_type", "sampling_correction"])
        for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
            positive(key, getattr(self, key))
            used_only_with(key, getattr(self, key), getattr(GRPOConfig, key), self.loss_type == "sapo",
                           "loss_type=sapo")
        at_least("off_policy_mask_threshold", self.off_policy_mask_threshold, 0.0)  # 0: any drift at all
        if self.loss_type in ("sapo", "vespo"):  # no clip to read them
            used_only_with("eps_low", self.eps_low, GRPOConfig.eps_low, False, "a clipped loss_type (not sapo or vespo)")
            used_only_with("eps_high", self.eps_high, GRPOConfig.eps_high, False, "a clipped loss_type (not sapo or vespo)")
        used_only_with("use_bias_correction_kl", self.use_bias_correction_kl, False, self.beta != 0,
                       "a KL term (beta != 0)")
        at_least("entropy_coef", self.entropy_coef, 0.0)
        if (self.entropy_coef or self.use_adaptive_entropy) and self.top_entropy_quantile < 1:
            raise ConfigError("entropy_coef's bonus is over every answer token; with top_entropy_quantile < 1 TRL takes "
                              "it over the kept tokens alone: not implemented here, set one")
        for key in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            at_least(key, getattr(self, key), 0.0)
            used_only_with(key, getattr(self, key), getattr(GRPOConfig, key), self.use_adaptive_entropy,
                           "use_adaptive_entropy=true")
        if self.use_adaptive_entropy and not self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max:
            raise ConfigError(f"use_adaptive_entropy keeps entropy_coef, its starting value ({self.entropy_coef}), within "
                              f"[entropy_coef_min, entropy_coef_max] = [{self.entropy_coef_min}, {self.entropy_coef_max}]",
                              keys=["entropy_coef", "entropy_coef_min", "entropy_coef_max"])
        if self.delta is not None and not self.delta > high:
            raise ConfigError(f"config key 'delta' must be > 1 + eps_high = {high:g} (the cap of the ratio where the "
                              f"advantage is negative; at or below it, it would cap positive advantages too); "
                              f"got {self.delta!r}")


def advantages_for(cfg: GRPOConfig, samples: Samples, completions, prompts, passed, fields, tokenizer, process_fn,
                   outcome, weights: list[float]):
    """(B, C) advantages: PRM from step rewards, or ORM broadcast over each output's tokens; and,
    for a process reward, each output's mean step reward (B,) (NaN where it has no step), else None.
    ``weights``: the outcome functions' (``outcome.per_function`` in order; a DAPO overlong penalty
    after them weighs 1)."""
    length = samples.completion_ids.shape[1]
    if process_fn is not None:
        steps = call_reward(process_fn, cfg.reward_timeout_s, prompts, completions, tokenizer=tokenizer, **passed,
                            **fields)
        ends = [[e for e, _ in s] for s in steps]
        values = [[float(r) for _, r in s] for s in steps]
        means = torch.tensor([sum(v) / len(v) if v else float("nan") for v in values])
        return process_advantages(ends, values, cfg.group_size, length, cfg.scale_rewards == "group"), means
    if cfg.multi_objective_aggregation == "normalize_then_sum":  # GDPO: normalised over the batch once it is whole
        columns = torch.stack(list(outcome.per_function.values()), -1)  # (B, K)
        # a sample every reward abstained on has no score (its overlong penalty alone is none): out of every column
        columns = columns.masked_fill(outcome.rewards.isnan()[:, None], float("nan"))
        adv = decoupled_advantages(columns, [*weights, 1.0][: columns.shape[1]], cfg.group_size).nan_to_num(0.0)
        return adv[:, None].expand(-1, length).clone(), None
    if cfg.advantage_estimator == "rloo":  # without the KL: rloo_advantages adds it once pi_old and pi_ref are known
        return loo_advantages(clipped_rewards(outcome.rewards, cfg), cfg.group_size)[:, None].expand(-1, length).clone(), None
    # batch: centred here, scaled once the step's batch is whole (scaled_by_batch)
    adv = group_advantages(outcome.rewards, cfg.group_size, cfg.scale_rewards == "group")  # (B,)
    return adv[:, None].expand(-1, length).clone(), None


def clipped_rewards(rewards: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """The weighted outcome rewards clamped to ``reward_clip_range`` (NaN stays NaN); as they are without."""
    return rewards if cfg.reward_clip_range is None else rewards.clamp(*cfg.reward_clip_range)


def rloo_advantages(run: Run, policy, reference, batch: Rollout, cfg: GRPOConfig) -> tuple[Rollout, dict]:
    """RLOO's advantages of the step's batch (losses/grpo.py): with a reference (beta > 0), each
    answer's reward less beta x its summed k1 between pi_old and pi_ref, then the leave-one-out
    baseline, then with ``normalize_advantages`` centred and scaled over the batch on all ranks.
    Also ``kl``: the mean k1 per token, all ranks. pi_old is the trainer's forward, as TRL's, even
    where the backend's log-probs are exact: the same forward as the reference's, so that where the
    policy is its reference the KL is exactly 0 (the sampler's log-probs differ by float noise, 1e-8
    a token, which would reach every advantage, those of groups without a signal too)."""
    samples, mask = batch.samples, batch.samples.completion_mask
    rewards, metrics = clipped_rewards(batch.outcome.rewards, cfg).to(mask.device), {}
    if reference is not None:
        chunks, group = micro_batches(torch.arange(mask.shape[0], device=mask.device), mask.shape[0], cfg)
        with reference() as ref_model:
            ref = chunked_logprobs(ref_model, samples, chunks, group, cfg.temperature, cfg.train.dtype)
        old = chunked_logprobs(policy, samples, chunks, group, cfg.temperature, cfg.train.dtype)
        kl = sequence_k1(old, ref, mask.to(old.dtype))  # (B,)
        rewards = rewards - cfg.beta * kl.to(rewards.dtype)
        totals = reduce_dict({"kl": kl.sum(), "tokens": mask.sum()}, run.info)
        metrics["kl"] = totals["kl"] / max(totals["tokens"], 1.0)
    advantages = loo_advantages(rewards, cfg.group_size)
    batch = replace(batch, advantages=advantages[:, None].expand_as(batch.advantages).clone())
    if not cfg.normalize_advantages:
        return batch, metrics
    # a sample in a group with one scored answer has no baseline: out of the statistics, as TRL's NaN is
    present = ~rewards.isnan()
    scored = present & (present.view(-1, cfg.group_size).sum(-1, keepdim=True) > 1).expand(-1, cfg.group_size).flatten()
    return normalised_over_batch(batch, run.info, scored=scored), metrics


def rollout(backend, tokenizer, rows, cfg: GRPOConfig, rewards: Rewards, trainer_state=None) -> Rollout:
    """Sample, score and compute advantages for one batch of prompt rows. ``trainer_state``: what
    rewards that take it get (``global_step``, ``max_steps``, as TRL's)."""
    start = time.time()
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.group_size)
    samples = backend.generate(row_prompt_ids(tokenizer, rows), params)
    generation_s = time.time() - start
    scored = score_samples(tokenizer, samples, rows, cfg.group_size, rewards, cfg.reward_errors, cfg.reward_timeout_s,
                           trainer_state)
    outcome, prompts, completions, fields, passed = (scored.outcome, scored.prompts, scored.completions,
                                                     scored.fields, scored.passed)
    if cfg.overlong_buffer:  # DAPO: long answers lose reward over the buffer before max_new_tokens
        penalty = overlong_penalty(samples.completion_mask.sum(-1).cpu(), cfg.max_new_tokens, cfg.overlong_buffer,
                                   cfg.overlong_penalty)
        outcome = replace(outcome, rewards=outcome.rewards + penalty,
                          per_function={**outcome.per_function, "overlong": penalty})
    advantages, steps = advantages_for(cfg, samples, completions, prompts, passed, fields, tokenizer,
                                       bind(rewards.process, samples, scored.rows), outcome, rewards.weights)
    if steps is not None:  # logged as reward/process_mean: what the update learns from (the outcome is not)
        outcome = replace(outcome, per_function={**outcome.per_function, "process": steps})
    advantages = advantages.to(samples.completion_ids.device)
    return Rollout(samples, outcome, advantages, generation_s)


def skips_rows(run: Run, cfg: GRPOConfig) -> bool:
    """Whether the update leaves groups without a signal out (``forwarded_rows``)."""
    return (cfg.beta == 0 and cfg.skip_zero_advantage and not run.shards_models and not run.router_coef
            and cfg.top_entropy_quantile == 1  # its threshold is over every token of the batch
            and not (cfg.entropy_coef or cfg.use_adaptive_entropy))  # the bonus reads every answer, whatever its A


def forwarded_rows(run: Run, advantages: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """The rows the update forwards: all of them, or, with beta 0 (``skip_zero_advantage``), the
    groups where some advantage is non-zero. A row whose advantages are all zero adds nothing to the
    loss or its gradient when there is no KL term: -min(r A, clip(r) A) is 0 with A = 0 whatever r
    is, and the loss's normalisers count every row, so the update is the same but for float
    rounding. Whole groups, so that a micro-batch still forwards each prompt once for its G samples.
    Where no group has a signal the first is forwarded (its gradient is zero), so that every rank
    logs the same metrics. A sharded policy forwards every row: its ranks must run the same forwards."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    if not skips_rows(run, cfg):
        return rows
    live = informative(advantages, cfg.group_size).repeat_interleave(cfg.group_size)
    if not live.any():
        live[: cfg.group_size] = True
    return rows[live]


def micro_batches(rows: torch.Tensor, whole: int, cfg: GRPOConfig) -> tuple[list, int]:
    """``rows`` in forwards of ``train.micro_batch_size`` rows (else ``whole``), and the group size
    each forward shares a prompt over: G where every micro-batch holds whole groups, else 1."""
    chunks = [rows[i] for i in row_chunks(len(rows), cfg.train.micro_batch_size or whole)]
    return chunks, cfg.group_size if cfg.share_prompt and all(len(i) % cfg.group_size == 0 for i in chunks) else 1


BALANCE_RANKS = True  # False: each replicated rank forwards its own groups with a signal (benchmarks/balance.py)


@dataclass
class UpdateRows:
    """One optimizer step's share of a batch on this rank, with what its steps read: the samples and
    advantages, the loss's normalisers over all ranks (``counts``), the rows forwarded and their
    micro-batches (``chunks``), and pi_ref's and pi_old's log-probs (None where not needed)."""
    samples: Samples
    advantages: torch.Tensor
    counts: dict
    rows: torch.Tensor
    chunks: list
    group: int
    forwards: float
    ref_logprobs: torch.Tensor | None
    old_logprobs: torch.Tensor | None
    local_rows: int  # this rank's rows before the balance: the forwarded rows' share is of these

    @property
    def forwarded(self) -> torch.Tensor:  # the tokens the logged means are over
        return self.samples.completion_mask[self.rows].sum().clamp(min=1)


def update_rows(run: Run, policy, reference, samples: Samples, advantages: torch.Tensor, cfg: GRPOConfig,
                exact: bool, pad_id: int, off_policy: bool) -> UpdateRows | None:
    """These rows made ready for their optimizer steps (None where every rank's are masked out):
    balanced over ranks and chosen (``forwarded_rows``), and pi_ref's and, ``off_policy`` (mu > 1
    or more than one minibatch: a step after the first meets a policy that has moved), pi_old's
    log-probs: the backend's when they are exact, else a forward now, before any step."""
    mask = samples.completion_mask
    # "answers": every answer of these groups, those masked out too (Dr. GRPO's constant normaliser, as TRL's);
    # "sequences": those left in the loss (the other means over answers, as verl's)
    counts = reduce_dict({"sequences": (mask.sum(-1) > 0).sum().item(), "tokens": mask.sum().item(),
                          "answers": mask.shape[0]}, run.info)
    if counts["sequences"] == 0:  # every group of every rank dropped: no update, on every rank alike
        return None
    local_rows = mask.shape[0]
    if BALANCE_RANKS and skips_rows(run, cfg) and run.info.enabled:
        live = informative(advantages, cfg.group_size).nonzero().flatten().tolist()
        samples, advantages = balanced_groups(run.info, samples, advantages, live, cfg.group_size, pad_id)
        mask = samples.completion_mask
    rows = forwarded_rows(run, advantages, mask, cfg)
    # a rank dealt more rows than it sampled forwards them in forwards of at most its own batch's rows
    chunks, group = micro_batches(rows, local_rows, cfg)
    # a mixture of experts' router balancing loss: a mean over the step's forwards on every rank
    forwards = reduce_dict({"forwards": len(chunks)}, run.info)["forwards"] if run.router_coef else 1
    ref_logprobs = old_logprobs = None
    if reference is not None:
        with reference() as ref_model:
            ref_logprobs = chunked_logprobs(ref_model, samples, chunks, group, cfg.temperature, cfg.train.dtype)
    if off_policy:
        old_logprobs = samples.logprobs if exact else chunked_logprobs(policy, samples, chunks, group, cfg.temperature,
                                                                       cfg.train.dtype)
    return UpdateRows(samples, advantages, counts, rows, chunks, group, forwards, ref_logprobs, old_logprobs,
                      local_rows)


class EntropyBonus:
    """The entropy bonus's coefficient c (losses/grpo.py): ``entropy_coef`` as set, or with
    ``use_adaptive_entropy`` Skywork-OR1's adaptive control (He et al. 2025; TRL's form): after each
    optimizer step c moves by ``entropy_coef_delta`` toward more bonus where the step's mean token
    entropy H over every rank's answers is at or below ``entropy_target`` and toward less otherwise,
    within [``entropy_coef_min``, ``entropy_coef_max``]; a step applies c only where the H before
    it was at or below the target (none at the first). c and that H are kept in the checkpoints."""

    def __init__(self, run: Run, cfg: GRPOConfig):
        self.run, self.cfg = run, cfg
        saved = run.state.get("entropy_control") if cfg.use_adaptive_entropy else None  # else as set
        self.coef, self.last = saved or (cfg.entropy_coef, float("inf"))

    @property
    def applied(self) -> float:
        adaptive = self.cfg.use_adaptive_entropy
        return self.coef if not adaptive or self.last <= self.cfg.entropy_target else 0.0

    def observe(self, entropy_sum: float, tokens: float) -> None:
        """One optimizer step's entropy over this rank's forwarded answer tokens (summed over ranks here)."""
        cfg = self.cfg
        if not cfg.use_adaptive_entropy:
            return
        step = reduce_dict({"sum": entropy_sum, "tokens": tokens}, self.run.info)
        self.last = step["sum"] / max(step["tokens"], 1.0)
        if self.last <= cfg.entropy_target:
            self.coef = min(self.coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
        else:
            self.coef = max(self.coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)
        self.run.keep["entropy_control"] = (self.coef, self.last)


def optimizer_step(run: Run, policy, part: UpdateRows, cfg: GRPOConfig, exact: bool, bonus: EntropyBonus,
                   measure_gap: bool = False, after_step=None) -> tuple[dict, float, float, float]:
    """One optimizer step on ``part``'s rows, micro-batched: (its statistics, each a mean over its
    forwarded tokens, with ``measure_gap`` the backend's log-prob gap from the policy before the
    step (else 0), loss, grad norm). ``bonus``: the entropy bonus's coefficient, told the step's
    entropy after it. ``after_step(optimizer steps so far)`` runs after it (TR-DPO's reference sync)."""
    samples, mask, forwarded = part.samples, part.samples.completion_mask, part.forwarded
    policy.train()
    loss, sums, gap, entropy_sum, coef = torch.zeros(()), {}, 0.0, 0.0, bonus.applied
    for index in part.chunks:
        with autocast(cfg.train.dtype, run.device), router_balance(policy, run.router_coef) as balance:
            logprobs, entropy = completion_logprobs(policy, samples.rows(index), with_entropy=True,
                                                    group_size=part.group, temperature=cfg.temperature,
                                                    entropy_grad=coef > 0)
        old = part.old_logprobs[index] if part.old_logprobs is not None else logprobs.detach()
        adv = part.advantages[index]
        if cfg.top_entropy_quantile < 1:  # A = 0 elsewhere: -min(r A, clip(r) A) is 0 there, and so its gradient
            adv = adv * high_entropy(entropy, mask[index], cfg.top_entropy_quantile, run.info).to(adv.dtype)
        masked = None
        if cfg.off_policy_mask_threshold is not None:  # A = 0 too: no policy term, the KL term stays
            # the sampling policy: the engine's log-probs, or the trainer's own pi_old for an exact backend (its
            # sampler's log-probs differ from the trainer's forward by float noise, which a threshold of 0 would mask)
            sampled = old if exact else samples.logprobs[index]
            keep = off_policy_keep(adv, logprobs, sampled, mask[index], cfg.off_policy_mask_threshold)
            masked = ((1 - keep) * mask[index]).sum() / mask[index].sum().clamp(min=1)
            adv = adv * keep
        weights = None  # the samples another engine drew, weighed to pi_old (old is the trainer's pi_old here)
        if not exact and cfg.sampling_correction != "none":
            weights = sampling_weights(old, samples.logprobs[index], mask[index], cfg.sampling_correction,
                                       cfg.sampling_correction_min, cfg.sampling_correction_max)
        value, stats = grpo_loss(logprobs, old, adv, mask[index],
                                 None if part.ref_logprobs is None else part.ref_logprobs[index], cfg.beta,
                                 cfg.eps_low, cfg.eps_high, REDUCTIONS[cfg.loss_type],
                                 part.counts["answers" if cfg.loss_type == "dr_grpo" else "sequences"],
                                 part.counts["tokens"], cfg.max_new_tokens,
                                 sequence_ratio=("total" if cfg.loss_type == "rloo" else
                                                 cfg.importance_sampling_level == "sequence"), delta=cfg.delta,
                                 sample_weights=weights, cispo=cfg.loss_type == "cispo",
                                 sapo=((cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
                                       if cfg.loss_type == "sapo" else None),
                                 kl_ratio=cfg.use_bias_correction_kl, entropy=entropy,
                                 entropy_coef=coef,
                                 vespo=(((cfg.vespo_k_pos, cfg.vespo_lambda_pos), (cfg.vespo_k_neg, cfg.vespo_lambda_neg))
                                        if cfg.loss_type == "vespo" else None))
        if masked is not None:  # the share of tokens whose policy term the mask dropped
            stats["off_policy_masked"] = masked
        value = balance.add_to(value, routed := {}, 1 / part.forwards)
        if routed:  # logged as the other statistics: the forwards' values weighed by their tokens
            stats["router_aux_loss"] = balance.mean().detach()
        value.backward()
        loss = loss + value.detach()
        share = mask[index].sum() / forwarded  # micro-batch stats weighted by tokens
        if cfg.use_adaptive_entropy:  # its controller's measure (a sync on a GPU: only where it is read)
            entropy_sum += float((entropy.detach() * mask[index]).sum())
        for k, v in {**stats, "entropy": (entropy * mask[index]).sum() / mask[index].sum().clamp(min=1)}.items():
            sums[k] = sums.get(k, 0.0) + float(v * share)
        if measure_gap:
            gap += float(((samples.logprobs[index] - logprobs.detach()).abs() * mask[index]).sum() / forwarded)
    if len(part.rows) < part.local_rows:  # a parameter only skipped rows reached has a zero gradient, not None:
        for p in policy.parameters():  # AdamW then steps it (momentum, decay) as the full update would
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    loss_value, grad_norm = run.optimizer_step(loss)
    bonus.observe(entropy_sum, float(forwarded))
    if after_step is not None:
        after_step(run.optimizer_steps)
    return sums, gap, loss_value, grad_norm


def minibatches(samples: Samples, advantages: torch.Tensor, cfg: GRPOConfig, world_size: int, seed: int) -> list:
    """This rank's batch as its minibatches, ``minibatch_size`` prompts each over all ranks:
    [(samples, advantages)]. Several: whole groups in an order drawn from ``seed``, as TRL
    shuffles a generation before it splits it (DAPO's dynamic sampling puts its filler groups
    last, and they would fill the last minibatches)."""
    n = samples.completion_mask.shape[0]
    per_rank = (cfg.minibatch_size or cfg.prompts_per_step) // world_size * cfg.group_size
    if per_rank >= n:
        return [(samples, advantages)]
    groups = torch.randperm(n // cfg.group_size, generator=torch.Generator().manual_seed(seed)).to(advantages.device)
    order = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size, device=groups.device)).flatten()
    return [(samples.rows(order[i]), advantages[order[i]]) for i in row_chunks(n, per_rank)]


def pi_old_gap(part: UpdateRows) -> float:
    """The backend's log-probs against pi_old (a forward before the batch's first step), as a mean
    over the part's forwarded tokens."""
    rows, mask = part.rows, part.samples.completion_mask[part.rows]
    return float(((part.samples.logprobs[rows] - part.old_logprobs[rows]).abs() * mask).sum() / part.forwarded)


def update(run: Run, policy, reference, batch: Rollout, cfg: GRPOConfig, exact: bool, pad_id: int,
           bonus: EntropyBonus, after_step=None) -> dict:
    """mu passes over one batch of samples, one optimizer step per minibatch (``minibatch_size``
    prompts; the whole batch by default). Returns the last pass's metrics (rank-local): each the
    mean over its steps' forwarded tokens, ``loss`` and ``grad_norm`` the mean of its steps';
    ``logprob_gap``: the backend's log-probs against the policy that sampled them, before any step
    (the first minibatch's forward, and pi_old's where it was a forward); ``update_skipped``: the
    share of minibatches with no answer left in the loss on any rank (they take no step).

    pi_old: with one step per batch the current policy (ratio 1 in value, not in gradient);
    otherwise the backend's log-probs when they are exact, else a forward pass before the first step.
    """
    samples, advantages = batch.samples, batch.advantages
    if cfg.dynamic_sampling:
        signal = has_signal(batch, cfg)
        samples = keep_informative_groups(samples, signal, cfg.group_size)
        # a dropped group's advantages are 0 too: the rows to forward are picked by them below
        advantages = advantages * signal.repeat_interleave(cfg.group_size)[:, None].to(advantages.dtype)
    if cfg.mask_truncated_completions:  # their advantages were taken with them in their groups, as TRL's are
        # cut off: no EOS and the whole length (an engine may stop on an end id that is not the tokenizer's EOS)
        ended = samples.finished | (samples.completion_mask.sum(-1) < cfg.max_new_tokens)
        samples = keep_rows(samples, ended)
        advantages = advantages * ended[:, None].to(advantages.dtype)  # not forwarded (beta 0), as dropped groups
    # the order of the groups: a function of the run's seed, the step and the rank (a resume draws it alike)
    seed = (cfg.train.seed * 1_000_003 + run.optimizer_steps) * 1_009 + run.info.rank
    split = minibatches(samples, advantages, cfg, run.info.world_size, seed)
    off_policy = cfg.mu > 1 or len(split) > 1
    parts = [p for p in (update_rows(run, policy, reference, s, a, cfg, exact, pad_id, off_policy) for s, a in split)
             if p is not None]  # the counts are every rank's: the ranks keep the same parts
    if not parts:
        return {"update_skipped": 1.0}
    tokens = [float(p.forwarded) for p in parts]
    gap = 0.0
    for iteration in range(cfg.mu):
        steps = [optimizer_step(run, policy, part, cfg, exact, bonus, measure_gap=iteration == 0 and k == 0,
                                after_step=after_step) for k, part in enumerate(parts)]
        if iteration == 0:  # later minibatches' forwards follow a step: their pi_old where it is a forward
            gaps = [(steps[0][1], tokens[0])] + ([] if exact else [(pi_old_gap(p), t) for p, t in
                                                                    zip(parts[1:], tokens[1:])])
            gap = sum(g * t for g, t in gaps) / sum(t for _, t in gaps)
    sums = {k: sum(s[k] * t for (s, _, _, _), t in zip(steps, tokens)) / sum(tokens) for k in steps[0][0]}
    if cfg.use_adaptive_entropy:  # as it stands after the step (AS_THEY_STAND), as TRL logs it
        sums["entropy_coef"] = bonus.coef
    return {**sums, "logprob_gap": gap, "loss": sum(s[2] for s in steps) / len(steps),
            "grad_norm": sum(s[3] for s in steps) / len(steps), "update_skipped": 1 - len(parts) / len(split),
            "update_rows_forwarded": sum(len(p.rows) for p in parts) / max(sum(p.local_rows for p in parts), 1)}


def run_grpo(cfg: GRPOConfig, reward_fns: list | None = None, weights: list[float] | None = None,
             process_fn=None, backend=None) -> dict:
    """Train with GRPO. Python callers may pass their own reward callables, and a rollout
    backend object of their own (rollout/backend.py) in place of ``rollout.backend``'s."""
    if process_fn is not None and not cfg.process_reward:  # the config's checks, as for the key, before any run
        shipped = next(iter(PROCESS_REWARDS))
        try:
            replace(cfg, process_reward=shipped)
        except ConfigError as e:
            raise ConfigError(f"a process reward passed to run_grpo (checked as process_reward={shipped} would "
                              f"be): {e}") from None
    keys = RewardKeys(cfg.rewards, type(cfg).rewards, cfg.process_reward, cfg.overlong_buffer,
                      cfg.train.micro_batch_size)
    rewards = resolve_rewards(keys, reward_fns, weights, process_fn)
    config = recorded_config(cfg, rewards, reward_fns is not None, process_fn is not None)
    refuse_offline_batch_fields(cfg.advantage_estimator, cfg.train)  # grpo or rloo: the run's name (start_run)
    tc = cfg.train
    run = start_run(tc, config, cfg.advantage_estimator, unit="rollout step", show=("reward_mean",))
    for line in replaced_rewards(keys, reward_fns is not None, process_fn is not None):
        run.say(line)
    if rewards.process is not None or cfg.process_reward:
        run.say("the process reward's steps drive the advantages (logged as reward/process_mean); the outcome "
                f"rewards ({config['rewards']}) "
                "are scored and logged only (reward_mean, reward/NAME_mean)")
    for key in ("prompts_per_step", "minibatch_size"):
        if (getattr(cfg, key) or 0) % run.info.world_size:
            raise ConfigError(f"{key}={getattr(cfg, key)} must divide over {run.info.world_size} ranks")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    rows, eval_rows, report = prompt_rows(run, cfg, tokenizer,
                                          [f for f in [*rewards.functions, rewards.process] if f is not None])
    policy = run.prepare(load_causal_lm(cfg.model, tokenizer, device=run.device), cfg.lora,
                         base=cfg.model, router_loss=True, dropout=False)
    check_positions(run, policy, report.longest, cfg.max_new_tokens)
    check_positions(run, policy, longest_prompt(eval_rows, tokenizer), cfg.eval_max_new_tokens)
    rewards = load_model_rewards(keys, rewards, tokenizer, run.device)
    retokenised = check_learned_rewards(run, rewards, rows, report.longest, cfg.max_new_tokens)
    reference = frozen_reference(run, policy, cfg.model, tokenizer, cfg.lora.enabled) if cfg.beta != 0 else None
    backend = backend or make_backend(cfg.rollout, tokenizer, policy, copy=run.shards_models,  # before sharding
                                      out_dir=tc.out_dir)
    run.shard(policy)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    say_generation_config(run, policy, tokenizer, params, cfg.model)
    exact = trainer_logprobs(backend, params, cfg.train.dtype)
    if cfg.loss_type == "vespo" and not exact and cfg.sampling_correction.startswith("sequence"):
        raise ConfigError(f"loss_type=vespo puts the sampling weights pi_old / pi_sampler into each answer's ratio "
                          f"token by token, and this backend's log-probs are not the trainer's ({cfg.train.dtype}, "
                          f"{type(backend).__name__}); sampling_correction={cfg.sampling_correction} weighs whole "
                          f"answers: set token_truncate, token_mask or none", keys=["loss_type", "sampling_correction"])
    evaluate = accuracy_eval(backend, policy, tokenizer, eval_rows, cfg.eval_max_new_tokens)
    before = run.start_eval(evaluate()) if evaluate else {}  # the start model's, also on resume
    optimizer = build_optimizer(policy, tc.lr, tc.weight_decay)
    updates = cfg.mu * (cfg.prompts_per_step // (cfg.minibatch_size or cfg.prompts_per_step))  # per rollout step
    if cfg.off_policy_mask_threshold is not None and exact and updates == 1:
        run.say("off_policy_mask_threshold: the sampler's log-probs are the policy's and each batch takes one step "
                "(mu 1, one minibatch), so no answer drifts and nothing is masked")
    total = run.plan(len(rows), cfg.prompts_per_step, "prompts", "prompts_per_step") * updates  # optimizer steps
    reference_moves = reference_sync(cfg, reference, policy, run, updates)  # TR-DPO's; the checkpoints hold the moved reference
    run.attach(policy, optimizer, build_scheduler(optimizer, total, tc.warmup_steps, tc.schedule, tc.min_lr_ratio),
               kept={"reference": reference.module} if reference_moves else None)
    bonus = EntropyBonus(run, cfg)  # after attach: a resumed run's coefficient is its checkpoint's
    order = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed)

    def draw(step: int, r: int) -> Rollout:  # this rank's share of the step's prompts (round 0) or of more
        indices = order.indices(step)
        if r > 0:
            indices = more_prompts(len(rows), indices, step, tc.seed, r, cfg.prompts_per_step)
        state = SimpleNamespace(global_step=run.optimizer_steps, max_steps=total)  # TRL's names, optimizer steps
        drawn = rollout(backend, tokenizer, [rows[i] for i in indices[run.info.rank::run.info.world_size]], cfg,
                        rewards, state)
        errors.first(run, drawn.outcome)
        say_foreign_ids(run, drawn.samples, tokenizer)
        return drawn

    abstained, errors = False, RewardErrors(run)
    for step in run.steps(evaluate):
        sync = time.time()
        backend.load_weights(policy)  # a sharded policy: the gathered full weights into the backend's copy
        sync = time.time() - sync
        if cfg.dynamic_sampling:
            pool, batch, fill = dynamic_batch(run, lambda r: draw(step, r), cfg, tokenizer.pad_token_id)
        else:
            pool = batch = draw(step, 0)
            fill = {}
        if cfg.scale_rewards == "batch":
            batch = scaled_by_batch(batch, run.info)
        if cfg.multi_objective_aggregation == "normalize_then_sum":
            batch = normalised_over_batch(batch, run.info)
        reward_kl = {}
        if cfg.advantage_estimator == "rloo":  # the KL is in the reward: the loss takes no reference
            batch, reward_kl = rloo_advantages(run, policy, reference, batch, cfg)
        if rewards.process is None and not abstained and all_abstained(pool.outcome):
            abstained = True
            run.say(f"step {step + 1}: every outcome reward abstained (returned None) on every sample, so the step's "
                    "samples have no reward and its groups carry no signal; said once a run")
        metrics = update(run, policy, reference if cfg.advantage_estimator == "grpo" else None, batch, cfg, exact,
                         tokenizer.pad_token_id, bonus, reference_moves)
        means = {**step_metrics(pool, cfg.group_size, run.info), **metrics, **reward_kl, **retokenised, **fill,
                 "time_weight_sync_s": sync}
        errors.count(means)  # before step_done: its checkpoint holds the totals with this step's
        run.step_done(means=means, evaluate=evaluate)
    summary = {"accuracy_before": before.get("accuracy"), "reward_mean": run.metrics.get("reward_mean"),
               **errors.summary(run)}
    if run.evals:
        summary["accuracy"] = run.evals[-1]["accuracy"]
    return run.finish(policy, tokenizer, summary)
