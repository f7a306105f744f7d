"""PPO with actor, critic, reward and reference models (InstructGPT stage 3).

One step reads top to bottom: the rollout backend samples completions from the actor ->
the frozen reward model scores them -> per-token KL rewards against the frozen reference ->
GAE over the critic's values -> several epochs of clipped policy and value updates on
minibatches, plus the PPO-ptx likelihood term when configured -> adapt the KL coefficient.
pi_old is the backend's log-probs when they are exact for the actor, else a forward pass.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..data.encode import SFTBatch, check_prompts, collate_sft, encode_sft, row_chunks, to_device
from ..data.rows import read_rows, source_name
from ..losses.grpo import SAMPLING_CORRECTIONS, sampling_weights
from ..losses.ppo import AdaptiveKL, explained_variance, gae, kl_penalty_rewards, policy_loss, value_loss
from ..losses.reduce import masked_mean, masked_whiten
from ..losses.sft import sft_loss
from ..models.forward import token_logprobs
from ..models.load import check_shared_tokenizer, disable_dropout, load_causal_lm, load_tokenizer
from ..models.lora import Reference
from ..models.reward import load_reward_model, require_reward_model, reward_scores, score_name, token_values
from ..rollout.backend import SamplingParams, make_backend
from ..rollout.evaluate import HeldOut, row_prompt_ids
from ..rollout.sampler import Samples, as_trained_on, completion_logprobs
from ..tasks import TASK_CHOICES
from ..train.config import (
    ConfigError,
    LoraConfig,
    RolloutConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    check_sampling_correction,
    choice,
    positive,
    used_only_with,
    within,
)
from ..train.dist import DistInfo, all_reduce_sum
from ..train.loop import BatchOrder, autocast, reduce_dict
from ..train.optim import build_optimizer, build_scheduler
from ..train.run import Run, start_run
from .common import (
    OFFLINE_BATCH,
    check_positions,
    chunked_logprobs,
    held_out,
    longest_prompt,
    refuse_offline_batch_fields,
    say_foreign_ids,
    say_generation_config,
    trainer_logprobs,
)


@dataclass(frozen=True)
class PPOConfig:
    UNREAD = OFFLINE_BATCH  # not a field: keys a config file or override may not set
    model: str = ""  # the actor's start: the SFT model (the reference is a frozen copy)
    tokenizer: str | None = None
    reward_model: str = ""  # a ...ForSequenceClassification folder (rlhfkit rm, or made elsewhere)
    critic: str | None = None  # the value model's start: default the reward model; or the SFT model
    train_data: str = ""  # prompts
    eval_data: str | None = None  # held-out prompts: greedy accuracy (checked by eval_task) and RM score
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    ptx_data: str | None = None  # PPO-ptx: SFT rows whose likelihood is kept up
    ptx_coef: float = 0.0
    ptx_max_length: int = 128  # longer ptx rows are truncated (and counted)
    prompts_per_step: int = 32  # over all ranks
    minibatch_size: int = 16  # rows per optimizer step, over all ranks
    ppo_epochs: int = 2
    max_new_tokens: int = 16
    temperature: float = 1.0  # sampling; pi_theta, pi_old and pi_ref are all of logits / temperature
    kl_coef: float = 0.05  # beta; the starting value when target_kl is set
    target_kl: float | None = None  # adaptive KL controller (Ziegler et al.) when set
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # the per-token KL penalty: k1 log(pi/pi_ref) (the papers'), k3 pi_ref/pi - log(pi_ref/pi) - 1
    gamma: float = 1.0
    lam: float = 0.95
    eps_clip: float = 0.2
    eps_value: float = 0.2
    score_scale: float = 1.0
    whiten_scores: bool = False
    score_clip: float | None = None
    missing_eos_penalty: float | None = None  # subtracted from the score of completions with no end id (EOS)
    critic_lr: float = 1e-4
    frozen_dtype: str = "fp32"  # fp32 | bf16 for the reward and reference models
    eval_limit: int = 500  # held-out prompts used; 0 = all
    eval_max_new_tokens: int = 16
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # rollout.backend: sampler | generate | vllm
    # a backend whose log-probs are not pi_old (vllm, generate, bf16 training): the policy loss weighed by
    # pi_old / pi_sampler, per sequence or token, masked or truncated outside [min, max], as GRPO's (none: off)
    sampling_correction: str = "sequence_mask"
    sampling_correction_min: float | None = None  # the weights' lower bound (None: none)
    sampling_correction_max: float | None = 3.0  # the weights' upper bound (None: none)
    lora: LoraConfig = field(default_factory=LoraConfig)  # actor and critic adapters; the reference is the base
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/ppo"))

    def __post_init__(self):
        choice("frozen_dtype", self.frozen_dtype, ("fp32", "bf16"))
        choice("eval_task", self.eval_task, TASK_CHOICES)
        choice("kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_sampling_correction(self, SAMPLING_CORRECTIONS)
        for key in ("prompts_per_step", "minibatch_size", "ppo_epochs", "max_new_tokens", "kl_horizon",
                    "eval_max_new_tokens", "ptx_max_length"):
            at_least(key, getattr(self, key), 1)
        for key in ("ptx_coef", "kl_coef", "temperature", "eps_value", "eval_limit", "missing_eos_penalty"):
            at_least(key, getattr(self, key), 0)
        used_only_with("kl_horizon", self.kl_horizon, PPOConfig.kl_horizon, self.target_kl is not None,
                       "the adaptive KL controller (target_kl)")
        used_only_with("ptx_max_length", self.ptx_max_length, PPOConfig.ptx_max_length, bool(self.ptx_data),
                       "PPO-ptx (ptx_data)")
        positive("critic_lr", self.critic_lr)  # 0 would train a critic that never moves
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "eval_task", "train.eval_every"),
                           bool(self.eval_data), "held-out evaluation (eval_data)")
        for key in ("gamma", "lam"):
            within(key, getattr(self, key), 0, 1)
        for key in ("eps_clip", "score_scale", "score_clip"):
            positive(key, getattr(self, key))
        if self.target_kl is not None and not self.target_kl > 0:
            raise ConfigError(f"config key 'target_kl' must be > 0 (or unset for a fixed kl_coef); got {self.target_kl}")
        if bool(self.ptx_data) != (self.ptx_coef > 0):  # one without the other would be silently unused
            raise ConfigError("PPO-ptx needs both ptx_data and ptx_coef > 0; got "
                              f"ptx_data={self.ptx_data!r}, ptx_coef={self.ptx_coef}")
        if self.prompts_per_step % self.minibatch_size:
            raise ConfigError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of minibatch_size "
                              f"({self.minibatch_size})")


@dataclass
class Experience:
    """One rollout batch, everything the updates need. Completion-aligned tensors are (B, C).

    The first epoch visits rows in ``first_order``; the critic forward of its first micro-batch
    ran with gradients during scoring (``first_values``) and serves twice: detached as V_old for
    GAE, and with its graph as that micro-batch's V (the critic has not changed yet, so both are
    the same numbers): one critic forward fewer per step.
    """

    samples: Samples
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor  # (B,) after scaling, penalty, whitening and clipping
    raw_scores: torch.Tensor  # (B,) the reward model's
    kl: torch.Tensor  # (B, C) the per-token KL penalty's estimate (kl_estimator) of pi_old against pi_ref
    first_order: torch.Tensor  # (B,) the first epoch's row order
    first_values: torch.Tensor | None = None  # critic values of first_order[:micro], with their graph
    logprob_gap: float = 0.0  # mean |backend log-prob - forward log-prob| when pi_old was recomputed
    recomputed: bool = False  # pi_old is a forward's, not the backend's: its samples are weighed (sampling_correction)

    def take_first_values(self) -> torch.Tensor | None:
        """The first micro-batch's values with their graph, once (stale after an optimizer step)."""
        values, self.first_values = self.first_values, None
        return values


def completion_values(critic, samples: Samples) -> torch.Tensor:
    """V(s) before each completion token: the critic read at the preceding position. (B, C)"""
    width = samples.prompt_ids.shape[1]
    values = token_values(critic, samples.input_ids, samples.attention_mask, first=width - 1)  # (B, C + 1)
    return values[:, :-1]


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, cfg: PPOConfig, total=None) -> torch.Tensor:
    """Scale, missing-EOS penalty, whitening and clipping of the reward model's scores. (B,)
    ``total``: partial sums -> the whole's (an all-reduce): every rank whitens with the statistics
    of all ranks' scores, as one process holding the whole batch would."""
    scores = raw * cfg.score_scale
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~finished).to(scores.dtype)
    if cfg.whiten_scores:
        count = (total or (lambda sums: sums))(torch.tensor([float(scores.numel())], dtype=torch.float64))
        if count.item() > 1:  # one score in all has no spread to divide by: left as it is
            scores = masked_whiten(scores, torch.ones_like(scores), total=total)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


def critic_values(critic, samples: Samples, first_rows: torch.Tensor, chunk: int = 0):
    """V_old for every row (B, C), and the ``first_rows``' values with their graph; the other rows
    ``chunk`` at a time (0: in one forward)."""
    critic.train()
    with torch.enable_grad():
        first = completion_values(critic, samples.rows(first_rows))
    values = first.new_empty(samples.completion_ids.shape)
    values[first_rows] = first.detach()
    rest = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    rest[first_rows] = False
    rest = rest.nonzero().squeeze(-1)
    for part in row_chunks(len(rest), chunk):
        values[rest[part]] = completion_values(critic, samples.rows(rest[part]))
    return values, first


@torch.no_grad()
def make_experience(models: dict, backend, prompt_ids: list, cfg: PPOConfig, beta: float, exact: bool = True,
                    info: DistInfo | None = None) -> tuple[Experience, dict]:
    """Sample, score, and turn the scores into per-token advantages and returns.

    Under torchrun each rank holds its share of the prompts; advantages are whitened with the
    statistics of all ranks' tokens, as one process holding the whole batch would.
    """
    info = info or DistInfo()
    first_order = torch.randperm(len(prompt_ids))
    t0 = time.time()
    samples = backend.generate(prompt_ids, SamplingParams(cfg.max_new_tokens, cfg.temperature))
    t1 = time.time()
    chunk = cfg.train.micro_batch_size  # rows per scoring forward too (0: the whole batch in one)
    chunks = row_chunks(len(prompt_ids), chunk)
    raw = reward_scores(models["reward"], *as_trained_on(samples, backend.tokenizer.eos_token_id), chunk)  # (B,)
    with models["reference"]() as reference:  # a frozen copy, or the actor with its adapters off
        ref_logprobs = chunked_logprobs(reference, samples, chunks, temperature=cfg.temperature,
                                        dtype=cfg.train.dtype).float()  # in pi_old's dtype: the start's KL is float
    # rounding (exactly 0 under bf16, where pi_old is a forward too; ~1e-7 in fp32, where it is the sampler's own)
    size = cfg.minibatch_size // info.world_size  # this rank's rows of a minibatch
    micro = min(cfg.train.micro_batch_size or size, size)
    with autocast(cfg.train.dtype, str(samples.completion_ids.device)):  # as the update's forwards
        old_values, first_values = critic_values(models["critic"], samples, first_order[:micro], chunk)
    old_values = old_values.float()
    mask = samples.completion_mask
    old_logprobs, gap = samples.logprobs, 0.0
    if not exact:  # the backend's log-probs are not the actor's: pi_old from a forward pass
        old_logprobs = chunked_logprobs(models["actor"], samples, chunks, temperature=cfg.temperature,
                                        dtype=cfg.train.dtype).float()
        gap = float(((samples.logprobs - old_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1))
    t2 = time.time()
    scores = shape_scores(raw, samples.finished, cfg, total=lambda sums: all_reduce_sum(sums, info))
    rewards, kl = kl_penalty_rewards(old_logprobs, ref_logprobs, scores, mask, beta, cfg.kl_estimator)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask, total=lambda sums: all_reduce_sum(sums, info)) * mask
    exp = Experience(samples, old_logprobs, old_values, advantages, returns, mask, scores, raw, kl, first_order,
                     first_values, gap, recomputed=not exact)
    return exp, {"time_generation_s": t1 - t0, "time_scoring_s": t2 - t1}


def minibatch_loss(actor, critic, exp: Experience, index: torch.Tensor, cfg: PPOConfig, counts: dict,
                   values: torch.Tensor | None = None):
    """policy loss + value loss for the rows ``index``, token means over ``counts["tokens"]``
    (the minibatch's completion tokens on all ranks, so that the ranks' summed gradients are
    those of one process holding the whole minibatch), and the statistics as these rows' shares
    of such means (summed over micro-batches and ranks, they are the minibatch's). ``values``:
    these rows' critic values when already computed with their graph."""
    part = exp.samples.rows(index)
    mask = exp.mask[index]
    with autocast(cfg.train.dtype, str(exp.mask.device)):
        logprobs, entropy = completion_logprobs(actor, part, with_entropy=True, temperature=cfg.temperature)
        values = completion_values(critic, part) if values is None else values
    weights = None  # the samples another engine drew (vLLM, generate, a bf16 trainer), weighed to pi_old
    if exp.recomputed and cfg.sampling_correction != "none":
        weights = sampling_weights(exp.old_logprobs[index], exp.samples.logprobs[index], mask, cfg.sampling_correction,
                                   cfg.sampling_correction_min, cfg.sampling_correction_max)
    pol, pol_stats = policy_loss(logprobs, exp.old_logprobs[index], exp.advantages[index], mask, cfg.eps_clip,
                                 counts["tokens"], weights)
    val, val_stats = value_loss(values, exp.old_values[index], exp.returns[index], mask, cfg.eps_value,
                                counts["tokens"])
    # every statistic as these rows' share of its mean over the minibatch's tokens on all ranks (the
    # losses are such shares already; the other means are over these rows' tokens)
    share = mask.sum() / max(float(counts["tokens"]), 1.0)
    stats = {"policy_loss": pol.detach(), "value_loss": val.detach(),
             **{k: v * share for k, v in {"entropy": masked_mean(entropy.detach(), mask), **pol_stats,
                                           **val_stats}.items()}}
    return pol + val, stats


def ptx_loss(actor, batch, cfg: PPOConfig, num_tokens: float):
    """PPO-ptx: ptx_coef times the SFT loss on ``batch`` (a token mean over all ranks' tokens)."""
    with autocast(cfg.train.dtype, str(batch.input_ids.device)):
        logprobs = token_logprobs(actor, batch.input_ids, batch.attention_mask, batch.completion_mask)
    loss, _ = sft_loss(logprobs, batch.completion_mask, num_tokens)
    return cfg.ptx_coef * loss, loss.detach()


def ppo_update(run: Run, models: dict, exp: Experience, cfg: PPOConfig, ptx_batches: list | None) -> dict:
    """``ppo_epochs`` passes of shuffled minibatches over one rollout batch; returns mean stats."""
    models["actor"].train()
    models["critic"].train()
    n_rows = exp.mask.shape[0]
    size = cfg.minibatch_size // run.info.world_size  # this rank's part of each minibatch
    per_epoch = n_rows // size
    stats_sum: dict = {}
    for epoch in range(cfg.ppo_epochs):
        order = exp.first_order if epoch == 0 else torch.randperm(n_rows)
        for k in range(per_epoch):
            n = epoch * per_epoch + k
            stats = minibatch_step(run, models, exp, order[k * size: (k + 1) * size], cfg,
                                   ptx_batches[n] if ptx_batches else None)
            for key, v in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(v) / (cfg.ppo_epochs * per_epoch)
    return stats_sum


def minibatch_step(run: Run, models: dict, exp: Experience, rows: torch.Tensor, cfg: PPOConfig, ptx=None) -> dict:
    """One optimizer step on this rank's ``rows`` of a minibatch, micro-batched, plus PPO-ptx.
    Returns the loss and gradient norm (``WHOLE``) and this rank's shares of the token means."""
    counts = reduce_dict({"tokens": exp.mask[rows].sum().item(),
                          "ptx_tokens": ptx.completion_mask[:, 1:].sum().item() if ptx is not None else 0.0}, run.info)
    loss, stats = torch.zeros(()), {}
    for index in row_chunks(len(rows), cfg.train.micro_batch_size):
        values = exp.take_first_values()  # the first micro-batch of the first minibatch only; else None
        part, micro = minibatch_loss(models["actor"], models["critic"], exp, rows[index], cfg, counts, values)
        part.backward()
        loss = loss + part.detach()
        for key, v in micro.items():  # shares of the means over all ranks' tokens
            stats[key] = stats.get(key, 0.0) + float(v)
    if ptx is not None and cfg.ptx_coef > 0:  # micro-batched as the rollout rows are
        ptx_share = 0.0
        for index in row_chunks(ptx.input_ids.shape[0], cfg.train.micro_batch_size):
            width = int(ptx.attention_mask[index].sum(-1).max())  # right-padded: the chunk's own longest row
            chunk = SFTBatch(*(t[index, :width] for t in (ptx.input_ids, ptx.attention_mask, ptx.completion_mask)))
            part, share = ptx_loss(models["actor"], chunk, cfg, counts["ptx_tokens"])
            part.backward()
            loss, ptx_share = loss + part.detach(), ptx_share + float(share)
        stats["ptx_loss"] = ptx_share  # this rank's share of the mean over all ranks' ptx tokens
    stats["loss"], stats["grad_norm"] = run.optimizer_step(loss, clip_apart=[models["actor"], models["critic"]])
    return stats


WHOLE = ("loss", "grad_norm")  # minibatch_step's values that are the whole batch's on every rank; the rest are shares


def load_models(cfg: PPOConfig, device: str = "cpu", run: Run | None = None):
    """Actor, critic, reward model and the reference (a ``Reference``); ``run`` prepares the
    trained ones (LoRA adapters, activation checkpointing) and shards the frozen copy."""
    require_reward_model(cfg.reward_model)  # before anything loads: a causal LM would score with a random head
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    actor = disable_dropout(load_causal_lm(cfg.model, tokenizer, device=device))
    for role, folder in (("reward model", cfg.reward_model), ("critic", cfg.critic)):
        check_shared_tokenizer(folder, tokenizer, role, "actor", run.say if run is not None else None)
    start = cfg.critic or cfg.reward_model
    if isinstance(start, torch.nn.Module) and start is cfg.reward_model:  # a reward-model object (Python API): the
        start = copy.deepcopy(start).requires_grad_(True)  # critic starts from it as a model of its own (trained:
        # the scorer object is frozen, by the caller or by an earlier run_ppo), not the frozen scorer itself
    critic = disable_dropout(load_reward_model(start, tokenizer, seed=cfg.train.seed, device=device))
    reward = load_reward_model(cfg.reward_model, tokenizer, cfg.frozen_dtype, device=device).eval().requires_grad_(False)
    if run is not None:
        actor = run.prepare(actor, cfg.lora, base=cfg.model, dropout=False)
        critic = run.prepare(critic, cfg.lora, head=score_name(critic), base=cfg.critic or cfg.reward_model,
                             dropout=False)
    if cfg.lora.enabled and run is not None:
        reference = Reference(adapted=actor)
    else:
        frozen = load_causal_lm(cfg.model, tokenizer, cfg.frozen_dtype, device=device, copy=True)
        reference = Reference(module=frozen.eval().requires_grad_(False))
    return {"actor": actor, "critic": critic, "reward": reward, "reference": reference}, tokenizer


def modules(models: dict) -> dict:
    """The models that are modules of their own (the reference only when it is a copy)."""
    out = {k: m for k, m in models.items() if k != "reference"}
    if models["reference"].module is not None:
        out["reference"] = models["reference"].module
    return out


def model_memory_mb(models: dict) -> dict:
    return {f"memory_mb/{k}": round(sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20, 2)
            for k, m in modules(models).items()}


@torch.no_grad()
def evaluate(models: dict, backend, tokenizer, rows: HeldOut, cfg: PPOConfig) -> dict:
    """Greedy accuracy and the reward model's mean score of those same greedy samples."""
    backend.load_weights(models["actor"])
    out, samples, shown = rows.accuracy(backend, tokenizer, cfg.eval_max_new_tokens)
    scores = torch.cat([reward_scores(models["reward"], *as_trained_on(s, tokenizer.eos_token_id),
                                      cfg.train.micro_batch_size) for s in samples])  # as the training reward reads
    shown = [{**s, "rm_score": score} for s, score in zip(shown, scores.tolist())]
    return {**out, "rm_score": scores.mean().item(), "samples": shown}


def load_ptx(cfg: PPOConfig, tokenizer):
    """PPO-ptx rows and the order they are drawn in, one minibatch per optimizer step (None when off)."""
    if not (cfg.ptx_data and cfg.ptx_coef > 0):
        return None
    examples, report = encode_sft(read_rows(cfg.ptx_data), tokenizer, cfg.ptx_max_length, "truncate")
    return examples, BatchOrder(len(examples), cfg.minibatch_size, cfg.train.seed + 1), report


def ptx_batches_for(ptx, step: int, count: int, info: DistInfo, pad_id: int) -> list | None:
    """This rank's ptx rows for each of the ``count`` optimizer steps of rollout step ``step``."""
    if ptx is None:
        return None
    examples, order, _ = ptx
    return [to_device(collate_sft([examples[i] for i in order.indices(step * count + n)[info.rank::info.world_size]],
                                  pad_id), info.device) for n in range(count)]


def run_ppo(cfg: PPOConfig, backend=None) -> dict:
    """Train with PPO; ``backend``: a rollout backend object of the caller's instead of ``rollout.backend``'s."""
    refuse_offline_batch_fields("ppo", cfg.train)
    tc = cfg.train
    run = start_run(tc, cfg, "ppo", unit="rollout step", show=("rm_score", "kl"))
    if cfg.minibatch_size % run.info.world_size:
        raise ConfigError(f"minibatch_size={cfg.minibatch_size} must divide over {run.info.world_size} ranks")
    if cfg.temperature == 0:
        run.say("warning: temperature=0 rolls out the greedy answers, which are not samples of the policy whose "
                "log-probs (at temperature 1) the ratios and the KL read: the update is not PPO's (for checks "
                "only: two backends then decode the same tokens); train with temperature > 0")
    rows, eval_rows = read_rows(cfg.train_data), held_out(cfg.eval_data, cfg.eval_limit, cfg.eval_task, run.say)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    report = check_prompts(rows, tokenizer)  # every row, before any model loads
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    ptx = load_ptx(cfg, tokenizer)
    if ptx is not None:
        run.say(f"{source_name(cfg.ptx_data)} (ptx, over-long rows truncated to ptx_max_length): {ptx[2].summary()}")
    models, tokenizer = load_models(cfg, run.device, run)
    for name in ("actor", "reward", "critic"):
        check_positions(run, models[name], report.longest, cfg.max_new_tokens)
    check_positions(run, models["actor"], longest_prompt(eval_rows, tokenizer), cfg.eval_max_new_tokens)
    if ptx is not None:
        check_positions(run, models["actor"], ptx[2].longest)
    run.say("parameter memory " + ", ".join(f"{k.split('/')[1]} {v} MB" for k, v in model_memory_mb(models).items()))
    backend = backend or make_backend(cfg.rollout, tokenizer, models["actor"], copy=run.shards_models,  # before sharding
                                      out_dir=tc.out_dir)
    for name, model in modules(models).items():  # the reward model scores in its frozen_dtype, as replicated: only
        run.shard(model, cast=name != "reward")  # the models a run compares with the actor take FSDP2's bf16 policy
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature)
    say_generation_config(run, models["actor"], tokenizer, params, cfg.model)
    exact = trainer_logprobs(backend, params, tc.dtype)
    updates = cfg.ppo_epochs * (cfg.prompts_per_step // cfg.minibatch_size)  # optimizer steps per rollout step
    trained = torch.nn.ModuleDict({"actor": models["actor"], "critic": models["critic"]})
    optimizer = build_optimizer(trained, tc.lr, tc.weight_decay, {"actor": tc.lr, "critic": cfg.critic_lr})
    before = run.start_eval(evaluate(models, backend, tokenizer, eval_rows, cfg)) if eval_rows else {}  # the start's
    total = run.plan(len(rows), cfg.prompts_per_step, "prompts", "prompts_per_step") * updates  # optimizer steps
    run.attach(trained, optimizer, build_scheduler(optimizer, total, tc.warmup_steps, tc.schedule, tc.min_lr_ratio))
    kl_ctl = AdaptiveKL(run.state.get("kl_coef", cfg.kl_coef), cfg.target_kl or 1.0, cfg.kl_horizon)
    order, kls = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed), list(run.state.get("kls", []))
    evaluate_now = (lambda: evaluate(models, backend, tokenizer, eval_rows, cfg)) if eval_rows else None
    for step in run.steps(evaluate_now):
        sync = time.time()
        backend.load_weights(models["actor"])  # a sharded actor: the gathered full weights into the backend's copy
        sync = time.time() - sync
        prompt_ids = row_prompt_ids(tokenizer, [rows[i] for i in order.indices(step)[run.info.rank::run.info.world_size]])
        kl_coef = kl_ctl.beta  # this step's rewards' coefficient, logged as such (the controller then moves it)
        exp, metrics = make_experience(models, backend, prompt_ids, cfg, kl_coef, exact, run.info)
        say_foreign_ids(run, exp.samples, tokenizer)
        t0 = time.time()
        ptx_now = ptx_batches_for(ptx, step, updates, run.info, tokenizer.pad_token_id)
        shares = ppo_update(run, models, exp, cfg, ptx_now)
        metrics.update({key: shares.pop(key) for key in WHOLE})
        kls.append(reduce_dict({"kl": exp.kl.sum().item() / exp.kl.shape[0]}, run.info)["kl"] / run.info.world_size)
        if cfg.target_kl is not None:  # KL(pi || pi_ref) per completion, over all ranks
            kl_ctl.update(kls[-1], cfg.prompts_per_step)
        metrics.update(experience_metrics(exp, run.info), time_update_s=time.time() - t0, kl_coef=kl_coef,
                       time_weight_sync_s=sync)
        run.step_done(means=metrics, shares=shares, state={"kl_coef": kl_ctl.beta, "kls": kls}, evaluate=evaluate_now)
    run.save_model(models["critic"], tokenizer, f"{tc.out_dir}/critic", what="critic")
    return run.finish(models["actor"], tokenizer, ppo_summary(run, kls, kl_ctl.beta, before, models))


def ppo_summary(run: Run, kls: list[float], kl_coef: float, before: dict, models: dict) -> dict:
    tail = kls[-max(1, len(kls) // 10):]  # the last tenth of the run's steps
    summary = {"kl": sum(tail) / len(tail) if tail else None, "kl_over_last_steps": len(tail), "kl_coef": kl_coef,
               **model_memory_mb(models),
               "accuracy_before": before.get("accuracy"), "rm_score_before": before.get("rm_score")}
    if run.evals:
        summary.update(accuracy=run.evals[-1]["accuracy"], rm_score=run.evals[-1]["rm_score"])
    return summary


def experience_metrics(exp: Experience, info: DistInfo | None = None) -> dict:
    """Means over this rank's rows (every rank holds as many), and the critic's explained variance
    over all ranks' tokens."""
    lengths, info = exp.mask.sum(-1).float(), info or DistInfo()
    everywhere = explained_variance(exp.old_values, exp.returns, exp.mask, total=lambda s: all_reduce_sum(s, info))
    return {"rm_score": exp.raw_scores.mean().item(), "score": exp.scores.mean().item(),
            "kl": (exp.kl.sum() / exp.kl.shape[0]).item(), "logprob_gap": exp.logprob_gap,
            "explained_variance": everywhere.item(),
            "completion_len_mean": lengths.mean().item(), "eos_frac": exp.samples.finished.float().mean().item()}
