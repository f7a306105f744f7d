"""PPO with actor, critic, reward and reference models (InstructGPT stage 3).

One step reads top to bottom: sample completions from the actor -> score them with the
frozen reward model -> per-token KL rewards against the frozen reference -> GAE over the
critic's values -> several epochs of clipped policy and value updates on minibatches, plus
the PPO-ptx likelihood term when configured -> adapt the KL coefficient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..data.encode import collate_sft, encode_prompt, encode_sft, prompt_text
from ..data.rows import read_rows
from ..losses.ppo import AdaptiveKL, explained_variance, gae, kl_penalty_rewards, policy_loss, value_loss
from ..losses.reduce import masked_mean, masked_whiten
from ..losses.sft import sft_loss
from ..models.forward import token_logprobs
from ..models.load import load_tokenizer
from ..models.reward import load_reward_model, reward_scores, token_values
from ..rollout.evaluate import accuracy_of, greedy_completions
from ..rollout.sampler import Samples, completion_logprobs, sample
from ..train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..train.config import TrainConfig, to_dict
from ..train.dist import DistInfo, all_reduce_sum, broadcast_params, init_distributed
from ..train.logging import MetricsLogger, progress
from ..train.loop import BatchOrder, prepare_out_dir, seed_everything
from ..train.optim import build_optimizer, build_scheduler, optimizer_step
from .common import finish, load_policy, say


@dataclass(frozen=True)
class PPOConfig:
    model: str = ""  # the actor's start: the SFT model (the reference is a frozen copy)
    tokenizer: str | None = None
    reward_model: str = ""  # a ...ForSequenceClassification folder (rlhfkit rm, or made elsewhere)
    critic: str | None = None  # the value model's start: default the reward model; or the SFT model
    train_data: str = ""  # prompts
    eval_data: str | None = None  # held-out prompts with answers
    ptx_data: str | None = None  # PPO-ptx: SFT rows whose likelihood is kept up
    ptx_coef: float = 0.0
    prompts_per_step: int = 32
    minibatch_size: int = 16
    ppo_epochs: int = 2
    max_new_tokens: int = 16
    kl_coef: float = 0.05  # beta; the starting value when target_kl is set
    target_kl: float | None = None  # adaptive KL controller (Ziegler et al.) when set
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    eps_clip: float = 0.2
    eps_value: float = 0.2
    score_scale: float = 1.0
    whiten_scores: bool = False
    score_clip: float | None = None
    missing_eos_penalty: float | None = None  # subtracted from the score of completions with no EOS
    critic_lr: float = 1e-4
    frozen_dtype: str = "fp32"  # fp32 | bf16 for the reward and reference models
    eval_limit: int = 500
    eval_max_new_tokens: int = 16
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Experience:
    """One rollout batch, everything the updates need. Completion-aligned tensors are (B, C)."""

    samples: Samples
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor  # (B,) after scaling, penalty, whitening and clipping
    raw_scores: torch.Tensor  # (B,) the reward model's
    kl: torch.Tensor  # (B, C) log pi_old - log pi_ref
    live_values: torch.Tensor | None = None  # the first minibatch's critic values, with the graph (make_experience)


def completion_values(critic, samples: Samples) -> torch.Tensor:
    """V(s) before each completion token: the critic read at the preceding position. (B, C)"""
    values = token_values(critic, samples.input_ids, samples.attention_mask)  # (B, P + C)
    width = samples.prompt_ids.shape[1]
    return values[:, width - 1: -1]


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    scores = raw * cfg.score_scale
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~finished).to(scores.dtype)
    if cfg.whiten_scores and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


@torch.no_grad()
def make_experience(models: dict, tokenizer, prompt_ids: list, cfg: PPOConfig, beta: float,
                    live_rows: torch.Tensor | None = None, info: DistInfo | None = None) -> tuple[Experience, dict]:
    """Sample, score, and turn the scores into per-token advantages and returns.

    ``live_rows``: the rows of the first minibatch the update will train on. Their critic forward
    runs with gradients here and its values serve twice: detached as V_old for GAE, and with
    their graph as the first minibatch's V (the critic has not changed yet, so both are the same
    numbers); one no-grad critic forward fewer per step (with one minibatch, none at all).
    Under torchrun each rank holds its share of the prompts; advantages are whitened with the
    statistics of all ranks' tokens, as one process holding the whole batch would.
    """
    actor, critic, reward, reference = models["actor"], models["critic"], models["reward"], models["reference"]
    t0 = time.time()
    samples = sample(actor, prompt_ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                     max_new_tokens=cfg.max_new_tokens, temperature=1.0)
    t1 = time.time()
    raw = reward_scores(reward, samples.input_ids, samples.attention_mask)  # (B,)
    ref_logprobs = completion_logprobs(reference, samples).float()
    old_values, live_values = critic_values(critic, samples, live_rows)
    t2 = time.time()
    mask = samples.completion_mask
    old_logprobs = samples.logprobs  # temperature 1: equal to a fresh forward's (tested)
    scores = shape_scores(raw, samples.finished, cfg)
    rewards, kl = kl_penalty_rewards(old_logprobs, ref_logprobs, scores, mask, beta)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask, total=lambda sums: all_reduce_sum(sums, info or DistInfo())) * mask
    exp = Experience(samples, old_logprobs, old_values, advantages, returns, mask, scores, raw, kl, live_values)
    return exp, {"time_generation_s": t1 - t0, "time_scoring_s": t2 - t1}


def critic_values(critic, samples: Samples, live_rows: torch.Tensor | None):
    """V_old for every row (B, C), and the ``live_rows``' values with their graph (or None)."""
    if live_rows is None:
        return completion_values(critic, samples), None
    critic.train()
    with torch.enable_grad():
        live = completion_values(critic, samples.rows(live_rows))
    values = torch.empty(samples.completion_ids.shape, dtype=live.dtype)
    values[live_rows] = live.detach()
    rest = torch.ones(values.shape[0], dtype=torch.bool)
    rest[live_rows] = False
    if rest.any():
        values[rest] = completion_values(critic, samples.rows(rest.nonzero().squeeze(-1)))
    return values, live


def minibatch_loss(actor, critic, exp: Experience, index: torch.Tensor, cfg: PPOConfig, ptx_batch=None,
                   values: torch.Tensor | None = None, info: DistInfo | None = None):
    """policy loss + value loss (+ ptx_coef * SFT loss on ``ptx_batch``) for the rows ``index``.

    ``values``: the critic's values for these rows when already computed with their graph.
    Under torchrun each token mean is taken over the minibatch's tokens on all ranks, so that the
    gradients the ranks sum are those of one process holding the whole minibatch.
    """
    part = exp.samples.rows(index)
    mask = exp.mask[index]
    logprobs, entropy = completion_logprobs(actor, part, with_entropy=True)
    pol, pol_stats = policy_loss(logprobs, exp.old_logprobs[index], exp.advantages[index], mask, cfg.eps_clip)
    if values is None:
        values = completion_values(critic, part)
    val, val_stats = value_loss(values, exp.old_values[index], exp.returns[index], mask, cfg.eps_value)
    loss = (pol + val) * rank_share(mask.sum(), info)
    stats = {"policy_loss": pol.detach(), "value_loss": val.detach(), "entropy": masked_mean(entropy.detach(), mask),
             **pol_stats, **val_stats}
    if ptx_batch is not None and cfg.ptx_coef > 0:
        ptx_lp = token_logprobs(actor, ptx_batch.input_ids, ptx_batch.attention_mask, ptx_batch.completion_mask)
        ptx, _ = sft_loss(ptx_lp, ptx_batch.completion_mask)
        loss = loss + cfg.ptx_coef * ptx * rank_share(ptx_batch.completion_mask.sum(), info)
        stats["ptx_loss"] = ptx.detach()
    return loss, stats


def rank_share(local_count: torch.Tensor, info: DistInfo | None) -> torch.Tensor | float:
    """This rank's share of a count summed over ranks (1.0 in a single process)."""
    if info is None or not info.enabled:
        return 1.0
    local = local_count.detach().to(torch.float64)
    return (local / all_reduce_sum(local.clone(), info).clamp(min=1)).float()


def ppo_update(models: dict, trained, optimizer, scheduler, exp: Experience, cfg: PPOConfig, info, step: int,
               ptx_batches: list | None, first_perm: torch.Tensor) -> dict:
    """``ppo_epochs`` passes of shuffled minibatches over one rollout batch; returns mean stats.

    ``first_perm``: the first epoch's row order (it starts with make_experience's ``live_rows``)."""
    trained.train()
    n_rows = exp.mask.shape[0]
    size = cfg.minibatch_size // info.world_size  # this rank's part of each minibatch
    minibatches = n_rows // size
    stats_sum: dict = {}
    for epoch in range(cfg.ppo_epochs):
        perm = first_perm if epoch == 0 else torch.randperm(n_rows)
        for k in range(minibatches):
            index = perm[k * size: (k + 1) * size]
            ptx_batch = ptx_batches[epoch * minibatches + k] if ptx_batches else None
            live = exp.live_values if epoch == 0 and k == 0 else None  # the same rows: perm starts with live_rows
            loss, stats = minibatch_loss(models["actor"], models["critic"], exp, index, cfg, ptx_batch, live, info)
            loss.backward()
            optimizer_step(trained, optimizer, scheduler, cfg.train.max_grad_norm, info, step + 1,
                           clip_apart=[models["actor"], models["critic"]])
            for key, v in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + v.item() / (cfg.ppo_epochs * minibatches)
    return stats_sum


def load_models(cfg: PPOConfig):
    actor, tokenizer = load_policy(cfg.model, cfg.tokenizer)
    reward_tok = load_tokenizer(cfg.reward_model, cfg.tokenizer or cfg.model)
    if reward_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the reward model at {cfg.reward_model} uses another tokenizer than the actor; "
                         "rlhfkit's PPO needs one shared tokenizer")
    reward = load_reward_model(cfg.reward_model, tokenizer, cfg.frozen_dtype).eval().requires_grad_(False)
    critic = load_reward_model(cfg.critic or cfg.reward_model, tokenizer, seed=cfg.train.seed)
    reference = load_policy(cfg.model, cfg.tokenizer)[0].to(reward.dtype).eval().requires_grad_(False)
    return {"actor": actor, "critic": critic, "reward": reward, "reference": reference}, tokenizer


def model_memory_mb(models: dict) -> dict:
    return {f"memory_mb/{k}": round(sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20, 2)
            for k, m in models.items()}


@torch.no_grad()
def evaluate(models: dict, tokenizer, rows, cfg: PPOConfig) -> dict:
    """Greedy exact-match accuracy and mean reward-model score on held-out prompts."""
    texts = greedy_completions(models["actor"], tokenizer, rows, cfg.eval_max_new_tokens)
    out = accuracy_of(texts, rows)
    ids = [encode_prompt(tokenizer, prompt_text(r, tokenizer)) + tokenizer(t, add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id] for r, t in zip(rows, texts)]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    out["rm_score"] = reward_scores(models["reward"], input_ids, attention).mean().item()
    return out


def check_batch_sizes(cfg: PPOConfig, world_size: int) -> None:
    if cfg.prompts_per_step % cfg.minibatch_size or cfg.minibatch_size % world_size:
        raise ValueError(f"ppo: prompts_per_step ({cfg.prompts_per_step}) must be a multiple of minibatch_size "
                         f"({cfg.minibatch_size}), and minibatch_size a multiple of the number of ranks ({world_size})")


def run_ppo(cfg: PPOConfig) -> dict:
    info = init_distributed()
    check_batch_sizes(cfg, info.world_size)
    tc = cfg.train
    prepare_out_dir(tc, info)
    seed_everything(tc.seed + info.rank)
    models, tokenizer = load_models(cfg)
    trained = torch.nn.ModuleDict({"actor": models["actor"], "critic": models["critic"]})
    broadcast_params(trained, info)
    say("ppo: parameter memory " + ", ".join(f"{k.split('/')[1]} {v} MB" for k, v in model_memory_mb(models).items()))
    rows = read_rows(cfg.train_data)
    ptx = encode_sft(read_rows(cfg.ptx_data), tokenizer, 128, "truncate")[0] if cfg.ptx_data and cfg.ptx_coef > 0 else None
    eval_rows = read_rows(cfg.eval_data)[: cfg.eval_limit] if cfg.eval_data else None
    minibatches = cfg.prompts_per_step // cfg.minibatch_size
    optimizer = build_optimizer(trained, tc.lr, tc.weight_decay, {"actor": tc.lr, "critic": cfg.critic_lr})
    scheduler = build_scheduler(optimizer, tc.max_steps * cfg.ppo_epochs * minibatches, tc.warmup_steps, tc.schedule,
                                tc.min_lr_ratio)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl or 1.0, cfg.kl_horizon)
    start = 0
    if tc.resume:
        state = load_checkpoint(latest_checkpoint(tc.out_dir), trained, optimizer, scheduler)
        start, kl_ctl.beta = state["step"], state["kl_coef"]
        say(f"ppo: resuming from step {start}")
    before = evaluate(models, tokenizer, eval_rows, cfg) if eval_rows else {}
    order = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed)
    ptx_order = BatchOrder(len(ptx), cfg.minibatch_size, tc.seed + 1) if ptx else None
    logger = MetricsLogger(tc.out_dir, enabled=info.is_main, tensorboard=tc.tensorboard)
    bar = progress(tc.max_steps, start, desc="ppo", enabled=info.is_main and tc.progress)
    evals, kls = [], []
    for step in range(start, tc.max_steps):
        batch_rows = [rows[i] for i in order.indices(step)[info.rank::info.world_size]]
        prompt_ids = [encode_prompt(tokenizer, prompt_text(r, tokenizer), chat="messages" in r.data) for r in batch_rows]
        first_perm = torch.randperm(len(prompt_ids))
        exp, metrics = make_experience(models, tokenizer, prompt_ids, cfg, kl_ctl.beta,
                                       live_rows=first_perm[: cfg.minibatch_size // info.world_size], info=info)
        t0 = time.time()
        ptx_batches = None
        if ptx_order is not None:
            first = step * cfg.ppo_epochs * minibatches
            ptx_batches = [collate_sft([ptx[i] for i in ptx_order.indices(first + n)[info.rank::info.world_size]],
                                       tokenizer.pad_token_id)
                           for n in range(cfg.ppo_epochs * minibatches)]
        stats_sum = ppo_update(models, trained, optimizer, scheduler, exp, cfg, info, step, ptx_batches, first_perm)
        # KL(pi || pi_ref) per completion, sampled estimate, over all ranks' completions
        kl_sum, n_seq = all_reduce_sum(torch.tensor([exp.kl.sum().item(), exp.kl.shape[0]], dtype=torch.float64),
                                       info).tolist()
        kl_seq = kl_sum / n_seq
        kls.append(kl_seq)
        if cfg.target_kl is not None:
            kl_ctl.update(kl_seq, int(n_seq))
        lengths = exp.mask.sum(-1).float()
        metrics.update(stats_sum, time_update_s=time.time() - t0, rm_score=exp.raw_scores.mean().item(),
                       score=exp.scores.mean().item(), kl=kl_seq, kl_coef=kl_ctl.beta,
                       explained_variance=explained_variance(exp.old_values, exp.returns, exp.mask).item(),
                       completion_len_mean=lengths.mean().item(), eos_frac=exp.samples.finished.float().mean().item())
        done = step + 1
        bar.update(1)
        bar.set_postfix(rm=f"{metrics['rm_score']:.3f}", kl=f"{kl_seq:.3f}")
        if done % tc.log_every == 0 or done == tc.max_steps:
            logger.log(done, metrics)
        if eval_rows and ((tc.eval_every and done % tc.eval_every == 0) or done == tc.max_steps):
            evals.append({"step": done, **evaluate(models, tokenizer, eval_rows, cfg)})
            logger.log(done, evals[-1], prefix="eval")
            bar.write(f"step {done}: accuracy={evals[-1]['accuracy']:.4f} rm_score={evals[-1]['rm_score']:.4f}")
        if info.is_main and ((tc.save_every and done % tc.save_every == 0) or done == tc.max_steps):
            save_checkpoint(tc.out_dir, done, trained, optimizer, scheduler, to_dict(cfg),
                            extra={"kl_coef": kl_ctl.beta, "prompts_seen": done * cfg.prompts_per_step},
                            keep=tc.keep_checkpoints)
    bar.close()
    logger.close()
    tail = kls[-max(1, len(kls) // 10):]
    summary = {"steps": tc.max_steps, "kl": sum(tail) / len(tail) if tail else None, "kl_coef": kl_ctl.beta,
               "accuracy_before": before.get("accuracy"), "rm_score_before": before.get("rm_score"), "evals": evals,
               **model_memory_mb(models)}
    if evals:
        summary.update(accuracy=evals[-1]["accuracy"], rm_score=evals[-1]["rm_score"])
    if info.is_main:
        models["critic"].save_pretrained(f"{tc.out_dir}/critic")
    return finish(models["actor"], tokenizer, cfg, tc.out_dir, summary)
