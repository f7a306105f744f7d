"""DPO on pairs, and its Plackett-Luce form on n-way rankings (Rafailov et al. 2023).

Reads top to bottom: config -> policy (optionally SFT on the chosen answers first) ->
reference log-probs (precomputed once, the default, or a frozen copy forwarded every step)
-> objective -> the shared loop -> save. All answers of a prompt go through the policy in
one concatenated forward.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from ..data.encode import SFTExample, collate_sft
from ..data.prefs import RankingBatch, collate_rankings, count_pairs, encode_rankings
from ..data.rows import read_rows
from ..losses.dpo import dpo_loss, plackett_luce_loss
from ..models.forward import token_logprobs
from ..rollout.evaluate import exact_match
from ..train.config import TrainConfig, replace, to_dict
from ..train.loop import Objective, train_offline
from .common import finish, load_policy, say
from .sft import sft_objective

REFERENCE_MODES = ("precompute", "forward")


@dataclass(frozen=True)
class DPOConfig:
    model: str = ""  # the SFT model (the reference is a frozen copy of it)
    tokenizer: str | None = None
    train_data: str = ""  # pairs (prompt, chosen, rejected) or rankings (prompt, completions best first)
    eval_data: str | None = None  # held-out pairs or rankings: preference accuracy
    eval_prompts: str | None = None  # held-out prompts with answers: exact-match accuracy
    max_length: int = 128
    overlong: str = "error"
    beta: float = 0.1
    reference: str = "precompute"  # precompute (once, then no reference model) | forward (every step)
    sft_first_steps: int = 0  # > 0: no SFT model yet, first maximise the likelihood of the chosen answers
    eval_limit: int = 500
    train: TrainConfig = field(default_factory=TrainConfig)


def sequence_logps(model, batch: RankingBatch) -> torch.Tensor:
    """log pi(y|x) summed over completion tokens, one per sequence of the batch. (N,)"""
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)  # (N, T)
    return (logprobs * batch.completion_mask).sum(-1)


@torch.no_grad()
def precompute_reference(reference, examples: list, pad_id: int, batch_size: int = 64) -> list:
    """The examples with ``ref_logps`` filled in by one pass of the reference model."""
    was_training = reference.training
    reference.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        batch = collate_rankings(chunk, pad_id)
        grid = batch.grid(sequence_logps(reference, batch))
        out.extend(dataclasses.replace(e, ref_logps=tuple(grid[p, : len(e.ranks)].tolist())) for p, e in enumerate(chunk))
    reference.train(was_training)
    return out


def dpo_objective(beta: float, reference=None) -> Objective:
    """``reference=None``: the batch carries precomputed reference log-probs."""

    def counts(batch) -> dict:
        return {"prompts": batch.num_prompts, "pairs": count_pairs(batch)}

    def loss(model, batch, totals):
        logps = batch.grid(sequence_logps(model, batch))  # (P, K)
        if reference is None:
            ref = batch.ref_logps
        else:
            with torch.no_grad():
                ref = batch.grid(sequence_logps(reference, batch))
        if batch.mask.shape[1] == 2:  # plain pairs: the paper's pairwise loss
            value, sums = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta, totals["prompts"])
        else:
            value, sums = plackett_luce_loss(logps, ref, batch.mask, beta, totals["prompts"])
        prompts = max(totals["prompts"], 1.0)
        metrics = {k: sums[k] / prompts for k in ("rewards_chosen", "rewards_rejected", "margin",
                                                    "logps_chosen", "logps_rejected")}
        metrics["preference_accuracy"] = sums["correct"] / max(totals["pairs"], 1.0)
        return value, metrics

    return Objective(counts, loss)


@torch.no_grad()
def preference_accuracy(model, examples: list, pad_id: int, batch_size: int = 64) -> float:
    """Fraction of ordered pairs whose implicit reward log(pi/pi_ref) ranks them right (ties count half)."""
    was_training = model.training
    model.eval()
    correct = pairs = 0
    for i in range(0, len(examples), batch_size):
        batch = collate_rankings(examples[i: i + batch_size], pad_id)
        reward = batch.grid(sequence_logps(model, batch)) - batch.ref_logps  # (P, K)
        r, m = batch.ranks, batch.mask.bool()
        better = (r[:, :, None] < r[:, None, :]) & m[:, :, None] & m[:, None, :]
        diff = reward[:, :, None] - reward[:, None, :]
        correct += float(((diff > 0) & better).sum()) + 0.5 * float(((diff == 0) & better).sum())
        pairs += int(better.sum())
    model.train(was_training)
    return correct / max(pairs, 1)


def sft_on_chosen(model, tokenizer, examples, cfg: DPOConfig) -> None:
    """SPEC.md: with no SFT model, first maximise the likelihood of the preferred answers."""
    chosen = [SFTExample(e.prompt_ids + e.completion_ids[0], len(e.prompt_ids)) for e in examples]
    sft_cfg = replace(cfg.train, out_dir=f"{cfg.train.out_dir}/sft_chosen", max_steps=cfg.sft_first_steps,
                      eval_every=0, resume=False)
    train_offline(model, chosen, lambda rows: collate_sft(rows, tokenizer.pad_token_id), sft_objective(), sft_cfg,
                  to_dict(cfg))


def run_dpo(cfg: DPOConfig) -> dict:
    if cfg.reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {cfg.reference!r}")
    model, tokenizer = load_policy(cfg.model, cfg.tokenizer)
    pad = tokenizer.pad_token_id
    examples, report = encode_rankings(read_rows(cfg.train_data), tokenizer, cfg.max_length, cfg.overlong)
    say(f"dpo: {cfg.train_data}: {report.summary()}")
    if cfg.sft_first_steps > 0 and not cfg.train.resume:
        sft_on_chosen(model, tokenizer, examples, cfg)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen starting policy
    held_out = []
    if cfg.eval_data:
        held_out, _ = encode_rankings(read_rows(cfg.eval_data), tokenizer, cfg.max_length, "skip")
        held_out = precompute_reference(reference, held_out[: cfg.eval_limit] if cfg.eval_limit > 0 else held_out, pad)
    prompts = read_rows(cfg.eval_prompts)[: cfg.eval_limit] if cfg.eval_prompts else None
    accuracy_before = exact_match(model, tokenizer, prompts, 16)["accuracy"] if prompts else None
    before = preference_accuracy(model, held_out, pad) if held_out else None  # 0.5: policy == reference
    if cfg.reference == "precompute":
        examples = precompute_reference(reference, examples, pad)
        reference = None  # no reference model in memory during training
        say("dpo: reference log-probs precomputed once; the reference model is released")

    def evaluate(model) -> dict:
        out = {"preference_accuracy": preference_accuracy(model, held_out, pad)} if held_out else {}
        if prompts:
            out["accuracy"] = exact_match(model, tokenizer, prompts, 16)["accuracy"]
        return out

    result = train_offline(model, examples, lambda rows: collate_rankings(rows, pad), dpo_objective(cfg.beta, reference),
                           cfg.train, to_dict(cfg), evaluate if (held_out or prompts) else None)
    summary = {"steps": result.steps, "loss": result.metrics.get("loss"), "reference": cfg.reference,
               "length_report": report.summary(), "evals": result.evals, "accuracy_before": accuracy_before}
    summary["preference_accuracy_before"] = before
    if result.evals:
        summary.update({k: v for k, v in result.evals[-1].items() if k != "step"})
    return finish(model, tokenizer, cfg, cfg.train.out_dir, summary)
