"""GRPO (Shao et al. 2024, DeepSeekMath, section 4.1), with Dr. GRPO and DAPO as options beside it.

Objective (maximised; the loss is its negative):

    J = E[ 1/G sum_i 1/|o_i| sum_t { min( rho_it A_it, clip(rho_it, 1-eps, 1+eps) A_it ) - beta KL_it } ]
    rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
    KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1          (k3: unbiased, always >= 0)

Advantages, outcome supervision (ORM): A_it = (r_i - mean(r)) / std(r) within the group.
Process supervision (PRM): normalise all step rewards of the group together, then
A_it = sum of the normalised step rewards of output i whose step ends at or after t.

Options, never replacing the paper's form: ``token_mean`` (DAPO: one mean over all tokens of
the batch), ``seq_mean_token_sum_norm`` (Dr. GRPO: constant per-length normaliser), no std
scaling (Dr. GRPO) or the batch's std in place of the group's (Lite PPO, methods/grpo_batch.py),
clip-higher (DAPO: eps_high > eps_low), two-sided clipping (INTELLECT-2's delta,
losses/policy.py), CISPO's clipped importance weights (``cispo``, losses/policy.py), DAPO's soft
overlong punishment
(``overlong_penalty``), and GSPO's sequence-level ratio (Zheng et al. 2025, eq. 5 and 7):

    J = E[ 1/G sum_i min( s_i A_i, clip(s_i, 1-eps, 1+eps) A_i ) ],   s_i = exp( 1/|o_i| sum_t log rho_it )

which is the paper's form under ``seq_mean_token_mean`` (each token of o_i carries s_i). LUSPO
(TRL's ``luspo``: GSPO's loss with each answer's term times its length, so that long answers are
not under-weighted) is the same sequence ratio under ``seq_mean_token_sum``, 1/G sum_i sum_t.

From DeepSeek-V3.2 (DeepSeek-AI 2025, section 3.1), under TRL's names: the unbiased KL estimate
(``use_bias_correction_kl``) weighs each token's k3 by its importance ratio, so that on samples
of pi_old its gradient is that of KL(pi_theta || pi_ref),

    KL_it = rho_it ( pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 )     (rho with its gradient)

and off-policy sequence masking (``off_policy_mask_threshold`` delta, eq. 9) drops the policy
term of an answer with a negative advantage that the policy has moved far from:

    M_it = 0  if A_it < 0 and 1/|o_i| sum_t log( pi_sampler(o_it) / pi_theta(o_it) ) > delta,  else 1

(pi_sampler: the policy as the rollout engine sampled it; pi_theta without gradient.) SAPO's
smooth gate in place of the clip is losses/policy.py's ``sapo_surrogate``, and VESPO's Gamma
weight of each answer's whole ratio its ``vespo_surrogate`` (with DAPO's token mean, as TRL's).

RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs", eq. 6 and section 3.2; TRL's RLOOTrainer): the KL to the
reference is part of each answer's reward, the sequence's k1 under pi_old, and each answer's
baseline is the mean reward of the group's other k - 1 answers,

    R_i = r_i - beta sum_t ( log pi_old(o_it) - log pi_ref(o_it) )
    A_i = R_i - 1/(k-1) sum_{j != i} R_j  =  k/(k-1) ( R_i - mean_group(R) )

and the loss carries no KL term. TRL's loss for it (``rloo``) takes the answer's whole ratio
s_i = pi_theta(o_i|q) / pi_old(o_i|q) = exp(sum_t log rho_it), clipped, a mean over answers not
divided by their lengths (at s_i = 1 REINFORCE's -A_i grad log pi(o_i|q), the paper's estimator):

    L = 1/G sum_i -min( s_i A_i, clip(s_i, 1-eps, 1+eps) A_i )

An entropy bonus (TRL's ``entropy_coef``, c; an exploration term of the policy-gradient
literature, Williams and Peng 1991) subtracts the mean entropy of the answers' next-token
distributions over the step's tokens, whatever the policy term's reduction:

    L' = L - c 1/N sum_{i,t} H( pi_theta( . | q, o_i,<t) )
"""

from __future__ import annotations

import torch

from .policy import cispo_surrogate, clipped_surrogate, sapo_surrogate, vespo_surrogate
from .reduce import seq_mean_token_mean, seq_mean_token_sum_norm, token_mean


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the outcome reward:

        R_length(y) = 0                                   |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                    = -1                                   L_max < |y|

    ``lengths`` (B,) completion tokens, L_max = ``max_length``, L_cache = ``buffer``; times
    ``factor`` (verl's ``penalty_factor``; 1 in the paper). (B,)"""
    over = (lengths.float() - (max_length - buffer)).clamp(min=0)
    return -(over / buffer).clamp(max=1.0) * factor


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """ORM: (B,) rewards, B = groups * G in group order -> (B,) advantages.

    A group whose rewards are all equal carries no signal and gets exactly 0 (in fp32 the mean
    of seven 0.7s is not 0.7, and the tiny difference divided by std + eps would not be 0).
    A NaN reward (a sample every reward function abstained on) takes no part in its group's mean
    and std, and its advantage is 0, as in TRL.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group of one has no baseline), got {group_size}")
    grouped = rewards.view(-1, group_size)  # (groups, G)
    present = ~grouped.isnan()
    n = present.sum(-1, keepdim=True)
    values = grouped.nan_to_num(0.0)
    centred = (values - values.sum(-1, keepdim=True) / n.clamp(min=1)) * present
    if scale_std:
        std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
        centred = centred / (std + eps)
    highest = grouped.nan_to_num(float("-inf")).amax(-1, keepdim=True)
    equal = highest <= grouped.nan_to_num(float("inf")).amin(-1, keepdim=True)  # (groups, 1); also fewer than 2 present
    return centred.masked_fill(equal, 0.0).reshape(-1)


def loo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages (module docstring): (B,) rewards, B = groups * G in group order -> (B,).

    A NaN reward (a sample every reward function abstained on) is left out of its group's
    baselines and its advantage is 0, as a group with fewer than two rewards (TRL's); a group whose
    rewards are all equal gets exactly 0 (its float mean is not)."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group of one has no baseline), got {group_size}")
    grouped = rewards.view(-1, group_size).double()  # (groups, G): the others' sum minus one's own, in float64
    present = ~grouped.isnan()
    n = present.sum(-1, keepdim=True)
    values = grouped.nan_to_num(0.0)
    others = (values.sum(-1, keepdim=True) - values) / (n - 1).clamp(min=1)
    highest = grouped.nan_to_num(float("-inf")).amax(-1, keepdim=True)
    equal = highest <= grouped.nan_to_num(float("inf")).amin(-1, keepdim=True)  # also fewer than 2 present
    advantages = ((values - others) * present).masked_fill(equal | (n < 2), 0.0)
    return advantages.reshape(-1).to(rewards.dtype)


def sequence_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t ( log pi(o_t) - log pi_ref(o_t) ) over each answer's tokens: the k1 estimate of the
    sequence's KL(pi || pi_ref) on a sample of pi, as RLOO's reward takes it. (B, T) -> (B,)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def decoupled_advantages(per_function: torch.Tensor, weights: list[float], group_size: int,
                         eps: float = 1e-4) -> torch.Tensor:
    """GDPO's first half (Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy
    Optimization for Multi-reward RL Optimization"; TRL's ``normalize_then_sum``): each of the K
    reward functions normalised within the group on its own, then summed with its weight,

        s_i = sum_k w_k (r_ik - mean_group(r_k)) / (std_group(r_k) + eps)

    so that a function with a wide range cannot drown the others before the group sees them. The
    second half normalises s over the whole batch (methods/grpo_batch.py ``normalised_over_batch``).
    ``per_function`` (B, K), NaN where a function abstained (left out of its group's statistics and
    0 in the sum); s is NaN where every function abstained. (B,)"""
    total = sum(w * group_advantages(per_function[:, k], group_size, True, eps) for k, w in enumerate(weights))
    return total.masked_fill(per_function.isnan().all(-1), float("nan"))


def process_advantages(step_ends: list[list[int]], step_rewards: list[list[float]], group_size: int,
                       length: int, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """PRM: per output, its steps' end token indices and rewards -> (B, length) advantages.

    All step rewards of a group are normalised together (mean and std over the group's
    steps); a token's advantage is the sum of its output's normalised rewards of the steps
    ending at or after it.
    """
    advantages = torch.zeros(len(step_ends), length)
    for g in range(0, len(step_ends), group_size):
        flat = torch.tensor([r for rs in step_rewards[g: g + group_size] for r in rs], dtype=torch.float32)
        if flat.numel() == 0 or bool((flat == flat[0]).all()):
            continue  # no steps, or all step rewards equal: no signal, exactly 0
        mean = flat.mean()
        std = flat.std() if flat.numel() > 1 else torch.tensor(0.0)
        for i in range(g, min(g + group_size, len(step_ends))):
            for end, reward in zip(step_ends[i], step_rewards[i]):
                normed = (reward - mean) / (std + eps) if scale_std else reward - mean
                advantages[i, : min(end, length - 1) + 1] += normed  # every token t <= index(j)
    return advantages


SAMPLING_CORRECTIONS = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate", "none")


def sampling_weights(old_logprobs: torch.Tensor, sampled_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                     low: float | None = None, high: float | None = 3.0) -> torch.Tensor:
    """Importance weights for samples another engine drew (vLLM's numerics, transformers'
    processed scores): w = pi_old / pi_sampler, the trainer's log-probs of the tokens over the
    engine's, per token or per sequence (the product over its tokens), then truncated to
    [low, high] or masked to 0 outside it (TRL's ``vllm_importance_sampling_mode``; truncated IS,
    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
    (B, T) for the token modes, (B, 1) for the sequence modes; a token with no engine log-prob
    (NaN) weighs 1."""
    diff = ((old_logprobs - sampled_logprobs) * mask).nan_to_num(0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    outside = (ratio < (low if low is not None else float("-inf"))) | (ratio > (high if high is not None else float("inf")))
    return ratio.masked_fill(outside, 0.0)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """pi_ref/pi - log(pi_ref/pi) - 1 per token (Schulman's k3); >= 0, and 0 where pi == pi_ref."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def off_policy_keep(advantages: torch.Tensor, logprobs: torch.Tensor, sampled_logprobs: torch.Tensor,
                    mask: torch.Tensor, delta: float) -> torch.Tensor:
    """Off-policy sequence masking's M (module docstring): (B, T), 1 where the policy term stays."""
    drift = ((sampled_logprobs - logprobs.detach()) * mask).nan_to_num(0.0).sum(-1, keepdim=True)
    far = drift / mask.sum(-1, keepdim=True).clamp(min=1) > delta  # (B, 1)
    return (~((advantages < 0) & far)).to(advantages.dtype)


# loss_type -> its reduction; cispo, sapo and vespo also have their own surrogates (losses/policy.py): cispo and
# vespo with DAPO's token mean, sapo with the paper's per-answer mean (as TRL's); luspo takes GSPO's sequence ratio,
# rloo the answer's whole ratio (``grpo_loss``'s sequence_ratio="total")
REDUCTIONS = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm",
              "cispo": "token_mean", "sapo": "seq_mean_token_mean", "luspo": "seq_mean_token_sum",
              "rloo": "seq_mean_token_mean", "vespo": "token_mean"}

# reduction name -> f(per_token, mask, num_sequences, num_tokens, max_tokens)
_REDUCE = {
    "seq_mean_token_mean": lambda v, m, seqs, toks, max_t: seq_mean_token_mean(v, m, seqs),
    "token_mean": lambda v, m, seqs, toks, max_t: token_mean(v, m, toks),
    "seq_mean_token_sum_norm": lambda v, m, seqs, toks, max_t: seq_mean_token_sum_norm(v, m, max_t, seqs),
    "seq_mean_token_sum": lambda v, m, seqs, toks, max_t: seq_mean_token_sum_norm(v, m, 1, seqs),  # LUSPO
}


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, reduction: str, num_sequences: float | None,
                num_tokens: float | None, max_tokens: int) -> torch.Tensor:
    if reduction not in _REDUCE:
        raise ValueError(f"unknown reduction {reduction!r}; one of {sorted(_REDUCE)}")
    return _REDUCE[reduction](per_token, mask, num_sequences, num_tokens, max_tokens)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = None, reduction: str = "seq_mean_token_mean",
              num_sequences: float | None = None, num_tokens: float | None = None, max_tokens: int | None = None,
              sequence_ratio: bool | str = False, delta: float | None = None, sample_weights: torch.Tensor | None = None,
              cispo: bool = False, sapo: tuple[float, float] | None = None, kl_ratio: bool = False,
              entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
              vespo: tuple[tuple[float, float], tuple[float, float]] | None = None):
    """All tensors (B, T) over completion tokens; ``mask`` 1 on real completion tokens.
    ``sequence_ratio``: GSPO's one importance ratio per sequence ("total": the answer's whole
    ratio, TRL's RLOO, under ``seq_mean_token_mean``: losses/policy.py ``sequence_log_ratio``),
    ``delta``: two-sided clipping's
    cap on the ratio where A < 0 (both in losses/policy.py). ``sample_weights`` (B, T) or (B, 1):
    ``sampling_weights``' importance weights of the policy term (the KL term keeps every token's).
    ``cispo``: CISPO's clipped-weight surrogate in place of the clipped ratio (losses/policy.py);
    ``sapo`` (tau_pos, tau_neg): SAPO's gate in its place. ``kl_ratio``: the KL term weighed by
    the importance ratio (the unbiased estimate, module docstring; GSPO's per-sequence ratio with
    ``sequence_ratio``). ``entropy`` (B, T), with its gradient, and ``entropy_coef``: the entropy
    bonus (module docstring), a mean over ``num_tokens``. ``vespo`` ((k, lambda) where A >= 0, where
    A < 0): VESPO's weight of the whole ratio in place of a clip; ``sample_weights`` (token weights
    pi_old / pi_sampler) then go into its ratio, as TRL's, not onto the loss.

    Returns (loss, metrics). The metrics are detached batch means (clip fractions, ratio, and kl
    where there is a KL term: with beta 0 nothing is measured, so no kl is reported).
    """
    mask = mask.to(logprobs.dtype)
    phi = None
    if vespo is not None:
        if sample_weights is not None and sample_weights.shape[-1] != mask.shape[-1]:
            raise ValueError("vespo takes the sampling weights token by token (a token mode): whole answers' weights "
                             "would count once a token in its ratio")
        log_weights = None if sample_weights is None else torch.log(sample_weights)
        surrogate, phi = vespo_surrogate(logprobs, old_logprobs, advantages, mask, *vespo, log_weights)
    elif cispo:
        surrogate = cispo_surrogate(logprobs, old_logprobs, advantages, eps_low if eps_high is None else eps_high)
    elif sapo is not None:
        surrogate = sapo_surrogate(logprobs, old_logprobs, advantages, *sapo, mask if sequence_ratio else None)
    else:
        surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high,
                                      mask if sequence_ratio else None, delta, sequence_ratio == "total")
    # (B, T); VESPO's sampling weights are in phi's ratio already
    per_token = surrogate.loss if sample_weights is None or vespo else surrogate.loss * sample_weights
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None and beta != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)
        if kl_ratio:
            log_ratio = logprobs - old_logprobs
            if sequence_ratio:  # the policy term's ratio: GSPO's geometric mean, or (rloo) the whole answer's
                log_ratio = (log_ratio * mask).sum(-1, keepdim=True)
                if sequence_ratio != "total":
                    log_ratio = log_ratio / mask.sum(-1, keepdim=True).clamp(min=1)
            kl = torch.exp(log_ratio) * kl
        per_token = per_token + beta * kl
    loss = reduce_loss(per_token, mask, reduction, num_sequences, num_tokens, max_tokens or logprobs.shape[1])
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * token_mean(entropy, mask, num_tokens)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        metrics = {"clip_frac_low": (surrogate.clipped_low * mask).sum() / n,
                   "clip_frac_high": (surrogate.clipped_high * mask).sum() / n,
                   "ratio_mean": (surrogate.ratio * mask).sum() / n}
        if ref_logprobs is not None and beta != 0.0:
            metrics["kl"] = (kl * mask).sum() / n
        if phi is not None:
            metrics["vespo_phi_mean"] = (phi * mask).sum() / n
        if sample_weights is not None:
            metrics["sampling_weight_mean"] = (sample_weights.expand_as(mask) * mask).sum() / n
    return loss, metrics
