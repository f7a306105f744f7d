"""Reward model on K-way rankings (InstructGPT stage 2).

All C(K,2) pairs of a prompt are in the same batch and each of its K outputs is forwarded
once (K sequences, not 2*C(K,2)); with ``share_prompt`` (the default) the prompt too, once for
its K outputs (data/prefs.py ``SharedPromptBatch``). The loss is losses/rm.py's. Reads top to bottom: config ->
load -> objective -> the shared loop -> save a ``...ForSequenceClassification`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.encode import OVERLONG_POLICIES, to_device
from ..data.prefs import (
    SharedPromptBatch,
    count_pairs,
    encode_rankings,
)
from ..data.rows import read_rows, source_name
from ..losses.reduce import pairs_right
from ..losses.rm import ranking_loss
from ..models.forward import eval_mode
from ..models.load import load_tokenizer
from ..models.reward import load_reward_model, reward_scores, score_name, shared_prompt_scores
from ..train.config import LoraConfig, TrainConfig, all_used_only_with, at_least, choice
from ..train.loop import Objective, train_offline
from ..train.run import start_run
from .common import check_positions, head, longest, ranking_collate


@dataclass(frozen=True)
class RMConfig:
    model: str = ""  # the SFT causal-LM folder, or a sequence-classifier folder
    tokenizer: str | None = None
    train_data: str = ""  # rankings (prompt, completions best first) or pairs (prompt, chosen, rejected)
    eval_data: str | None = None
    max_length: int = 128
    overlong: str = "error"
    eval_limit: int = 500  # held-out rankings used; 0 = all
    center_coef: float = 0.0  # > 0: keep each prompt's mean score near 0; same scale as TRL's center_rewards_coefficient
    share_prompt: bool = True  # forward each prompt once for all its outputs (block mask; SDPA attention only)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the backbone; the score head trains in full
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/rm"))

    def __post_init__(self):
        choice("overlong", self.overlong, OVERLONG_POLICIES)
        at_least("center_coef", self.center_coef, 0.0)
        at_least("max_length", self.max_length, 2)
        at_least("eval_limit", self.eval_limit, 0)
        all_used_only_with(self, ("eval_limit", "train.eval_every"), bool(self.eval_data), "held-out evaluation (eval_data)")


def batch_scores(model, batch) -> torch.Tensor:
    """r(x, y) of every output of a ``RankingBatch`` or ``SharedPromptBatch``, as a (P, K) grid."""
    if isinstance(batch, SharedPromptBatch):
        return batch.grid(shared_prompt_scores(model, batch))
    return batch.grid(reward_scores(model, batch.input_ids, batch.attention_mask))


def rm_objective(center_coef: float = 0.0) -> Objective:
    def counts(batch) -> dict:
        return {"prompts": batch.num_prompts, "pairs": count_pairs(batch), "outputs": batch.num_outputs}

    def loss(model, batch, totals):
        rewards = batch_scores(model, batch)  # (P, K)
        value, sums = ranking_loss(rewards, batch.mask, batch.ranks, totals["prompts"], center_coef, batch.margins)
        pairs = max(totals["pairs"], 1.0)
        return value, {"pairwise_accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs,
                       "reward_mean": (rewards * batch.mask).sum().detach() / totals["outputs"]}

    return Objective(counts, loss)


def ranking_stats(rewards: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor) -> dict:
    """Sums over a batch of (P, K) scored rankings: concordant pairs, pairs, per-row Kendall tau,
    top-1 hits.

    Tau is (concordant - discordant) / the pairs the ranking orders (tau-a over those pairs: a
    tie in rank makes no pair, a tie in score counts neither way). A pair tied in score counts
    half right, and top-1 with tied highest scores the share of them that are best-ranked: each a
    uniform tie-break's expected hit, so a constant score is right on half the pairs."""
    m = mask.bool()
    better = (ranks[:, :, None] < ranks[:, None, :]) & m[:, :, None] & m[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    n = better.sum((1, 2)).float()
    concordant = ((diff > 0) & better).sum((1, 2)).float()
    discordant = ((diff < 0) & better).sum((1, 2)).float()
    scores = rewards.masked_fill(~m, float("-inf"))
    at_max = (scores == scores.amax(-1, keepdim=True)) & m  # (P, K) the highest score, ties included
    best = ranks.masked_fill(~m, torch.iinfo(ranks.dtype).max).min(-1, keepdim=True).values
    hits = (at_max & (ranks == best)).sum(-1).float() / at_max.sum(-1).clamp(min=1)  # (P,)
    return {"correct": float(pairs_right(diff, better)), "pairs": int(n.sum()),
            "taus": ((concordant - discordant) / n.clamp(min=1)).tolist(), "top1": float(hits.sum())}


def ranking_metrics(model, examples, pad_id: int, batch_size: int = 64, share_prompt: bool = True) -> dict:
    """Held-out pairwise accuracy over all pairs, mean Kendall tau per ranking, and top-1 accuracy.

    Top-1: how often a best-ranked output gets the ranking's highest score. Far-off outputs make
    most pairs easy; top-1 shows whether the model also tells the best from the near misses,
    which is what a policy optimised against it will exploit.
    """
    collate = ranking_collate(model, pad_id, share_prompt)
    with eval_mode(model):
        correct = pairs = top1 = 0
        taus = []
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[i: i + batch_size]), next(model.parameters()).device)
            rewards = batch_scores(model, batch)
            stats = ranking_stats(rewards, batch.ranks, batch.mask)
            correct, pairs, top1 = correct + stats["correct"], pairs + stats["pairs"], top1 + stats["top1"]
            taus.extend(stats["taus"])
    return {"pairwise_accuracy": correct / max(pairs, 1), "kendall_tau": sum(taus) / len(taus),
            "top1_accuracy": top1 / max(len(taus), 1), "pairs": pairs}


def run_rm(cfg: RMConfig) -> dict:
    run = start_run(cfg.train, cfg, "rm")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    examples, report = encode_rankings(read_rows(cfg.train_data), tokenizer, cfg.max_length, cfg.overlong, method="rm")
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    held_out, eval_report = [], None
    if cfg.eval_data:
        rows = head(read_rows(cfg.eval_data), cfg.eval_limit, run.say, cfg.eval_data)
        held_out, eval_report = encode_rankings(rows, tokenizer, cfg.max_length, "skip")
        run.say(f"{source_name(cfg.eval_data)} (held out, over-long rows skipped): {eval_report.summary()}")
    # dropout off (as TRL's disable_dropout): the answers of a ranking are scored under one function
    model = load_reward_model(cfg.model, tokenizer, seed=cfg.train.seed, device=run.device)
    check_positions(run, model, longest(report, eval_report))
    model = run.shard(run.prepare(model, cfg.lora, head=score_name(model), base=cfg.model, dropout=False))
    evaluate = (lambda m: ranking_metrics(m, held_out, tokenizer.pad_token_id, share_prompt=cfg.share_prompt)) \
        if held_out else None
    collate = ranking_collate(model, tokenizer.pad_token_id, cfg.share_prompt)
    train_offline(run, model, examples, collate, rm_objective(cfg.center_coef), evaluate)
    summary = {"loss": run.metrics.get("loss"), "length_report": report.summary()}
    if run.evals:
        summary.update({k: run.evals[-1][k] for k in ("pairwise_accuracy", "kendall_tau", "top1_accuracy")})
    return run.finish(model, tokenizer, summary)
