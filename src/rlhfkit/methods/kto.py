"""KTO on unpaired answers, each desirable or not (Ethayarajh et al. 2024; TRL's KTOTrainer).

Reads top to bottom: config -> data (unpaired rows, or pairs read as two such rows) -> policy and
its frozen reference -> objective -> the shared loop -> save. A step's reference point z_0 is the
policy's log-ratio to the reference on mismatched pairs, each example's prompt with another
example's answer (data/unpaired.py), averaged over every micro-batch of the step on every rank and
clamped at 0, with no gradient (losses/kto.py): the same whatever the micro-batches and ranks.
TRL's is each micro-batch's, averaged over processes: the same where the step is one micro-batch.
The reference is forwarded every step (TRL's default), for the mismatched pairs too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.encode import OVERLONG_POLICIES, to_device
from ..data.formats import row_format
from ..data.prefs import encode_rankings
from ..data.rows import read_rows, source_name
from ..data.unpaired import UnpairedBatch, collate_unpaired, encode_unpaired, with_mismatched
from ..losses.kto import KTO_LOSSES, kto_loss, reference_point, weights_advice
from ..models.forward import eval_mode, router_balance
from ..models.load import load_causal_lm, load_tokenizer
from ..models.lora import Reference
from ..models.rankings import precompute_reference, preference_accuracy, sequence_logps
from ..rollout.backend import SamplerBackend
from ..tasks import TASK_CHOICES
from ..train.config import (
    LoraConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    choice,
    positive,
)
from ..train.loop import Objective, autocast, train_offline
from ..train.run import start_run
from .common import (
    RewardShift,
    accuracy_eval,
    check_positions,
    frozen_reference,
    head,
    held_out,
    longest_prompt,
)


@dataclass(frozen=True)
class KTOConfig:
    model: str = ""  # the SFT model (the reference is a frozen copy of it)
    tokenizer: str | None = None
    # unpaired rows (prompt, completion, label: true where desirable), or pairs (chosen desirable, rejected not)
    train_data: str = ""
    # held-out rows of the same kinds: the implicit rewards of each kind, and for pairs the preference accuracy
    eval_data: str | None = None
    eval_prompts: str | None = None  # held-out prompts: accuracy of greedy answers (checked by eval_task)
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    eval_max_new_tokens: int = 16
    max_length: int = 128  # prompt and answer together
    overlong: str = "error"
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D (TRL's name)
    undesirable_weight: float = 1.0  # lambda_U (TRL's name)
    # kto (the paper's) | apo_zero_unpaired (APO's anchor at 0, no reference point) | bco (BCO: each answer's
    # cross-entropy against the running mean of the rewards; TRL's BCOTrainer without its density-ratio weights)
    loss_type: str = "kto"
    eval_limit: int = 500  # held-out rows used, for both evals; 0 = all
    lora: LoraConfig = field(default_factory=LoraConfig)  # with adapters the reference is the base (adapters off)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/kto"))

    def __post_init__(self):
        choice("loss_type", self.loss_type, KTO_LOSSES)
        choice("overlong", self.overlong, OVERLONG_POLICIES)
        choice("eval_task", self.eval_task, TASK_CHOICES)
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            positive(key, getattr(self, key))
        at_least("max_length", self.max_length, 2)
        at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)
        at_least("eval_limit", self.eval_limit, 0)
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "train.eval_every"),
                           bool(self.eval_data or self.eval_prompts),
                           "held-out evaluation (eval_data, eval_prompts)")
        all_used_only_with(self, ("eval_max_new_tokens", "eval_task"), bool(self.eval_prompts),
                           "the held-out accuracy (eval_prompts)")


def kto_objective(cfg: KTOConfig, policy, reference: Reference, device: str, router_coef: float = 0.0,
                  shift: RewardShift | None = None) -> Objective:
    """The step's counts carry z_0's parts: the policy's and the reference's log-ratio summed over
    the mismatched pairs of each micro-batch (forwards without gradient, before any loss), so that
    every micro-batch's loss reads the whole step's reference point. ``shift``: bco's delta
    (``RewardShift``), given every answer's reward."""
    with_point = cfg.loss_type == "kto"

    def counts(batch: UnpairedBatch) -> dict:
        out = {"examples": batch.num_prompts, "desirable": int(batch.desirable.sum()), "forwards": 1}
        if with_point:
            with eval_mode(policy, reshard_after=False), autocast(cfg.train.dtype, device):
                mine = sequence_logps(policy, batch.mismatched)
                with reference() as ref_model:
                    theirs = sequence_logps(ref_model, batch.mismatched)
            out.update(kl_sum=float((mine - theirs).sum()), kl_pairs=batch.num_prompts)
        return out

    def loss(model, batch: UnpairedBatch, totals: dict):
        with router_balance(model, router_coef) as balance:
            logps = sequence_logps(model, batch.matched)  # (P,)
        with torch.no_grad(), reference() as ref_model:
            ref = sequence_logps(ref_model, batch.matched)
        point = reference_point(totals["kl_sum"], totals["kl_pairs"]) if with_point else 0.0
        if shift is not None:
            point = shift.mean
            shift.add(cfg.beta * (logps.detach() - ref))
        value, sums = kto_loss(logps, ref, batch.desirable, point, cfg.beta, cfg.desirable_weight,
                               cfg.undesirable_weight, cfg.loss_type, totals["examples"])
        good, bad = totals["desirable"], totals["examples"] - totals["desirable"]
        metrics = {}  # a kind the step has none of has no mean (and the margin none), as TRL leaves them out
        if good:
            metrics.update(rewards_chosen=sums["rewards_chosen"] / good, logps_chosen=sums["logps_chosen"] / good)
        if bad:
            metrics.update(rewards_rejected=sums["rewards_rejected"] / bad, logps_rejected=sums["logps_rejected"] / bad)
        if good and bad:
            metrics["margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
        if with_point or shift is not None:  # the same on every micro-batch: each carries its share of it
            name = "kl" if with_point else "reward_shift"
            metrics[name] = torch.tensor(point * batch.num_prompts / max(totals["examples"], 1.0))
        return balance.add_to(value, metrics, 1 / totals["forwards"]), metrics

    return Objective(counts, loss)


def implicit_rewards(model, reference: Reference, examples: list, pad_id: int, beta: float,
                     batch_size: int = 64) -> dict:
    """Held-out: the mean implicit reward beta log(pi / pi_ref) of the desirable answers and of
    the undesirable ones, and their gap (``margin``), which KTO widens."""
    device = next(model.parameters()).device
    totals = {True: [0.0, 0], False: [0.0, 0]}
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate_unpaired(examples[i: i + batch_size], pad_id), device)
            mine = sequence_logps(model, batch.matched)
            with reference() as ref_model:
                rewards = beta * (mine - sequence_logps(ref_model, batch.matched))
            for value, good in zip(rewards.tolist(), batch.desirable.tolist()):
                totals[good][0] += value
                totals[good][1] += 1
    out = {name: totals[k][0] / totals[k][1] for name, k in (("rewards_chosen", True), ("rewards_rejected", False))
           if totals[k][1]}
    if len(out) == 2:
        out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return out


def run_kto(cfg: KTOConfig) -> dict:
    run = start_run(cfg.train, cfg, "kto")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    pad = tokenizer.pad_token_id
    examples, report = encode_unpaired(read_rows(cfg.train_data), tokenizer, cfg.max_length, cfg.overlong)
    if cfg.loss_type == "kto":
        examples = with_mismatched(examples, cfg.max_length, cfg.train.seed)
    n_good = sum(e.desirable for e in examples)
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}; {n_good} desirable and {len(examples) - n_good} "
            "undesirable answers")
    advice = weights_advice(n_good, len(examples) - n_good, cfg.desirable_weight, cfg.undesirable_weight)
    if advice and cfg.loss_type == "kto":  # the KTO paper's advice
        run.say(f"warning: {advice}")
    if n_good in (0, len(examples)):  # the loss is defined for either kind alone; TRL warns here
        run.say(f"note: every answer is {'desirable' if n_good else 'undesirable'}: the loss only "
                f"{'raises' if n_good else 'lowers'} their likelihood against the reference point")
    held, pairs, eval_report = [], [], None
    if cfg.eval_data:
        rows = head(read_rows(cfg.eval_data), cfg.eval_limit, run.say, cfg.eval_data)
        held, eval_report = encode_unpaired(rows, tokenizer, cfg.max_length, "skip")
        run.say(f"{source_name(cfg.eval_data)} (held out, over-long rows skipped): {eval_report.summary()}")
        paired = [r for r in rows if row_format(r) in ("preference", "implicit_preference")]
        if paired:  # pairs: DPO's preference accuracy too, each pair's two implicit rewards compared
            pairs, _ = encode_rankings(paired, tokenizer, cfg.max_length, "skip", method="kto")
    prompts = held_out(cfg.eval_prompts, cfg.eval_limit, cfg.eval_task, run.say)
    # dropout off (as TRL's disable_dropout): the implicit rewards compare the policy with its frozen copy
    model = run.prepare(load_causal_lm(cfg.model, tokenizer, device=run.device), cfg.lora,
                        base=cfg.model, router_loss=True, dropout=False)
    # the longest forward: an answer after another example's prompt too (cut at max_length)
    widest = max(len(e.prompt_ids) + len(e.mismatched_ids or ()) for e in examples)
    check_positions(run, model, max(report.longest, (widest, report.longest[1]),
                                    eval_report.longest if eval_report else (0, "")))
    check_positions(run, model, longest_prompt(prompts, tokenizer), cfg.eval_max_new_tokens)
    backend = SamplerBackend(tokenizer, model, copy=run.shards_models)  # a copy is made before sharding
    reference = frozen_reference(run, model, cfg.model, tokenizer, cfg.lora.enabled)
    run.shard(model)
    if pairs:
        with reference() as ref_model:
            pairs = precompute_reference(ref_model, pairs, pad)
    accuracy = accuracy_eval(backend, model, tokenizer, prompts, cfg.eval_max_new_tokens)
    before = run.state.get("before") or {
        "accuracy_before": run.start_eval(accuracy())["accuracy"] if prompts else None}
    run.keep["before"] = before

    def evaluate(model) -> dict:
        out = implicit_rewards(model, reference, held, pad, cfg.beta) if held else {}
        if pairs:
            out["preference_accuracy"] = preference_accuracy(model, pairs, pad)
        return {**out, **(accuracy() if prompts else {})}

    shift = RewardShift(run) if cfg.loss_type == "bco" else None  # BCO's delta, kept in the checkpoints
    train_offline(run, model, examples, lambda rows: collate_unpaired(rows, pad),
                  kto_objective(cfg, model, reference, run.device, run.router_coef, shift),
                  evaluate if (held or prompts) else None, what="answers",
                  after_step=shift.update if shift is not None else None)
    summary = {"loss": run.metrics.get("loss"), "length_report": report.summary(), **before}
    if run.evals:
        summary.update({k: v for k, v in run.evals[-1].items() if k != "step"})
    return run.finish(model, tokenizer, summary)
