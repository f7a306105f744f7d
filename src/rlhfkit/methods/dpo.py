"""DPO on pairs, and its Plackett-Luce form on n-way rankings (Rafailov et al. 2023).

Reads top to bottom: config -> data -> policy (optionally SFT on the chosen answers first) ->
reference log-probs (precomputed once, the default, or a frozen copy forwarded every step, which
TR-DPO moves toward the policy every few steps, or none: CPO, SimPO and ORPO compare the policy's
own log-probs, methods/cpo.py and methods/orpo.py) -> objective -> the shared loop -> save. All
answers of a prompt go through the policy in one concatenated forward. Rankings must be strict
(no tied ranks): the Plackett-Luce model has no ties, so a tied ranking is refused (the reward
model accepts ties).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.encode import OVERLONG_POLICIES, SFTExample, collate_sft
from ..data.prefs import count_pairs, encode_rankings
from ..data.rows import DataError, Row, read_rows, source_name
from ..losses.dpo import (
    F_DIVERGENCE_FORMS,
    F_DIVERGENCES,
    MEAN_LOGPROB,
    ON_THE_MARGIN,
    PAIR_LOSSES,
    PER_TOKEN,
    REFERENCE_FREE,
    SMOOTHED,
    SORTED,
    chosen_nll,
    dpo_loss,
    plackett_luce_loss,
    wpo_weights,
)
from ..models.forward import router_balance
from ..models.load import load_causal_lm, load_tokenizer
from ..models.lora import Reference, is_adapter_folder
from ..models.rankings import (
    no_reference,
    output_logps,
    precompute_reference,
    preference_accuracy,
    sequence_logps,
)
from ..rollout.backend import SamplerBackend
from ..tasks import TASK_CHOICES
from ..train.checkpoint import CheckpointError
from ..train.config import (
    ConfigError,
    LoraConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    check_reference_sync,
    choice,
    positive,
    replace,
    used_only_with,
    within,
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
    longest,
    longest_prompt,
    ranking_collate,
    reference_sync,
)
from .sft import sft_objective

REFERENCE_MODES = ("precompute", "forward", "none")


@dataclass(frozen=True)
class DPOConfig:
    model: str = ""  # the SFT model (the reference is a frozen copy of it, but with reference=none)
    tokenizer: str | None = None
    train_data: str = ""  # pairs (prompt, chosen, rejected) or rankings (prompt, completions best first)
    eval_data: str | None = None  # held-out pairs or rankings: preference accuracy
    eval_prompts: str | None = None  # held-out prompts: accuracy of greedy answers (checked by eval_task)
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    eval_max_new_tokens: int = 16
    max_length: int = 128
    overlong: str = "error"
    beta: float = 0.1
    # sigmoid (the paper's) or another form of losses/dpo.py (ipo, hinge, robust, apo_zero, ...: pairs only);
    # several weighed together as "name:weight,name:weight" (TRL's loss_type list with loss_weights)
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # eps in [0, 0.5) of sigmoid (conservative DPO), robust, exo_pair and simpo
    discopop_tau: float = 0.05  # loss_type=discopop: its temperature (the paper's)
    simpo_gamma: float = 0.5  # loss_type=simpo: SimPO's target margin gamma (TRL's name and default)
    rpo_alpha: float = 0.0  # > 0: add rpo_alpha x the chosen answers' NLL per token (RPO; TRL's sft loss term)
    # AlphaPO (TRL's CPO alpha), reference=none: each answer's log-prob a (its mean for the per-token forms) read as
    # (1 - e^(-alpha a)) / alpha; 0: a itself. AlphaPO is loss_type=simpo with it and rpo_alpha=0
    alphapo_alpha: float = 0.0
    # f-DPO: the implicit reward's f-divergence, reverse_kl (DPO's) | forward_kl | js_divergence | alpha_divergence
    # (pairs, the forms on the margin; TRL's names)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # alpha_divergence: TRL's a in f'(t) = (t^(a-1) - 1) / (a - 1); the paper's 1 - a
    # LD-DPO: in [0, 1], the weight of an answer's tokens past the shorter answer's length (pairs; None: 1, DPO's)
    ld_alpha: float | None = None
    # WPO: each pair's loss times w(y_w) w(y_l), how likely the policy finds each answer per token (pairs; TRL's name)
    use_weighting: bool = False
    # precompute (once, then no reference model) | forward (every step) | none (no reference: the forms read
    # log pi itself; CPO, SimPO and ORPO, `rlhfkit cpo` and `rlhfkit orpo`)
    reference: str = "precompute"
    # TR-DPO (Gorbatovski et al. 2024; TRL's names): every ref_model_sync_steps optimizer steps the reference
    # becomes ref_model_mixup_alpha x the policy + (1 - alpha) x itself (alpha 1: a copy); needs reference=forward
    sync_ref_model: bool = False  # TR-DPO's reference sync (reference=forward, no LoRA)
    ref_model_mixup_alpha: float = 0.6  # alpha in (0, 1]: the policy's share of the new reference (1: a copy)
    ref_model_sync_steps: int = 512  # tau: a sync after every tau-th optimizer step (TRL's global_step)
    sft_first_steps: int = 0  # > 0: no SFT model yet, first maximise the likelihood of the chosen answers
    eval_limit: int = 500  # held-out rows used, for both evals; 0 = all
    share_prompt: bool = True  # forward each prompt once for all its answers (block mask; SDPA attention only)
    lora: LoraConfig = field(default_factory=LoraConfig)  # with adapters the reference is the base (adapters off)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/dpo"))

    def __post_init__(self):
        choice("reference", self.reference, REFERENCE_MODES)
        forms = [name for name, _ in loss_forms(self.loss_type)]
        if not isinstance(self.label_smoothing, (int, float)) or not 0 <= self.label_smoothing < 0.5:  # NaN too
            raise ConfigError(f"config key 'label_smoothing' must be in [0, 0.5) (0.5 ignores the labels); "
                              f"got {self.label_smoothing!r}")
        used_only_with("label_smoothing", self.label_smoothing, 0.0, any(f in SMOOTHED for f in forms),
                       f"loss_type {' or '.join(SMOOTHED)}")
        if "exo_pair" in forms and not self.label_smoothing > 0:
            raise ConfigError("loss_type=exo_pair needs label_smoothing > 0 (its label distribution is "
                              "(1 - eps, eps), and log 0 has no value; the EXO paper uses 1e-3)")
        positive("discopop_tau", self.discopop_tau)
        at_least("simpo_gamma", self.simpo_gamma, 0.0)
        used_only_with("simpo_gamma", self.simpo_gamma, DPOConfig.simpo_gamma, "simpo" in forms, "loss_type=simpo")
        if self.reference != "none" and (free := [f for f in forms if f in REFERENCE_FREE]):
            raise ConfigError(f"loss_type={','.join(free)} reads the answers' own probabilities (their odds), not "
                              f"ratios to a reference: set reference=none (`rlhfkit orpo` does)",
                              keys=["loss_type", "reference"])
        if self.reference == "none" and (ordered := [f for f in forms if f in SORTED]):
            raise ConfigError(f"loss_type={','.join(ordered)} (AOT) sorts log-ratios to a reference, and "
                              f"reference=none has none (the forms on the margin take none: {', '.join(ON_THE_MARGIN)})",
                              keys=["loss_type", "reference"])
        if self.use_weighting and (ordered := [f for f in forms if f in SORTED]):
            raise ConfigError(f"use_weighting weighs each pair's loss, and loss_type={','.join(ordered)} (AOT) sorts the "
                              "batch, so its terms belong to no pair (TRL refuses the two together too)",
                              keys=["use_weighting", "loss_type"])
        if self.reference == "none" and "bco_pair" in forms:
            raise ConfigError("loss_type=bco_pair (BCO) classifies each answer's reward beta log(pi / pi_ref) against "
                              "their running mean, and with reference=none that is beta log pi of a whole answer, "
                              "which a short answer wins: it needs a reference", keys=["loss_type", "reference"])
        if self.reference == "none" and (anchored := [f for f in forms if f not in ON_THE_MARGIN]):
            raise ConfigError(f"loss_type={','.join(anchored)} pulls each answer's log-ratio toward a fixed value, and "
                              f"with reference=none that is log pi of a whole answer, far below 0: it needs a "
                              f"reference (the forms on the margin take none: {', '.join(ON_THE_MARGIN)})",
                              keys=["loss_type", "reference"])
        if self.ld_alpha is not None and (means := [f for f in forms if f in MEAN_LOGPROB]):
            raise ConfigError(f"ld_alpha weighs DPO's sums; loss_type={','.join(means)} reads each answer's mean "
                              "log-prob over all its tokens (SimPO's and ORPO's), which LD-DPO's weights would bias",
                              keys=["ld_alpha", "loss_type"])
        if not math.isfinite(self.alphapo_alpha):
            raise ConfigError(f"config key 'alphapo_alpha' must be a number; got {self.alphapo_alpha!r}")
        if self.alphapo_alpha and (self.reference != "none" or "orpo" in forms):
            raise ConfigError("alphapo_alpha shapes the reward of the answers' own log-probs (AlphaPO; TRL's CPO "
                              + ("alpha): with a reference set reference=none (`rlhfkit cpo` does)"
                                 if self.reference != "none" else "alpha); loss_type=orpo reads their odds instead"),
                              keys=["alphapo_alpha", "reference" if self.reference != "none" else "loss_type"])
        if self.alphapo_alpha and (summed := [f for f in forms if f not in PER_TOKEN]):
            raise ConfigError(f"alphapo_alpha shapes each answer's mean log-prob (AlphaPO's length-normalised reward); "
                              f"loss_type={','.join(summed)} reads whole answers' sums, where e^(-alpha a) overflows "
                              f"for long answers (TRL's CPO takes it there): use {', '.join(p for p in PER_TOKEN if p != 'orpo')}",
                              keys=["alphapo_alpha", "loss_type"])
        if self.reference == "none" and self.f_divergence_type != "reverse_kl":
            raise ConfigError("f_divergence_type reads the ratio to a reference, and reference=none has none",
                              keys=["f_divergence_type", "reference"])
        used_only_with("discopop_tau", self.discopop_tau, DPOConfig.discopop_tau, "discopop" in forms,
                       "loss_type=discopop")
        choice("overlong", self.overlong, OVERLONG_POLICIES)
        choice("eval_task", self.eval_task, TASK_CHOICES)
        at_least("sft_first_steps", self.sft_first_steps, 0)
        at_least("rpo_alpha", self.rpo_alpha, 0.0)
        at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)
        at_least("max_length", self.max_length, 2)
        at_least("eval_limit", self.eval_limit, 0)
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "train.eval_every"),
                           bool(self.eval_data or self.eval_prompts),
                           "held-out evaluation (eval_data, eval_prompts)")
        all_used_only_with(self, ("eval_max_new_tokens", "eval_task"), bool(self.eval_prompts),
                           "the held-out accuracy (eval_prompts)")
        positive("beta", self.beta)
        choice("f_divergence_type", self.f_divergence_type, F_DIVERGENCES)
        other = [f for f in forms if f not in F_DIVERGENCE_FORMS]
        if self.f_divergence_type != "reverse_kl" and other:
            raise ConfigError(f"f_divergence_type={self.f_divergence_type} replaces the log-ratios of the forms on the "
                              f"margin ({', '.join(F_DIVERGENCE_FORMS)}); loss_type {', '.join(other)} has none")
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise ConfigError(f"config key 'f_alpha_divergence_coef' must be a number; got {self.f_alpha_divergence_coef!r}")
        used_only_with("f_alpha_divergence_coef", self.f_alpha_divergence_coef, DPOConfig.f_alpha_divergence_coef,
                       self.f_divergence_type == "alpha_divergence", "f_divergence_type=alpha_divergence")
        within("ld_alpha", self.ld_alpha, 0, 1)
        check_reference_sync(self)
        if self.sync_ref_model and self.reference != "forward":
            why = (", and reference=none has none to move (CPO, SimPO and ORPO compare the policy with itself): leave "
                   "it out" if self.reference == "none" else ", so its log-probs cannot be precomputed: set "
                   "reference=forward (TRL refuses precompute_ref_log_probs with it too)")
            raise ConfigError(f"sync_ref_model=true moves the reference during training{why}",
                              keys=["sync_ref_model", "reference"])


# TRL's loss_type names that rlhfkit has no form for, and why
NOT_HERE = {"sft": "the chosen answers' NLL is rpo_alpha=WEIGHT here",
            "aot_pair": "its form is loss_type=aot_unpaired (TRL's later name)", "alphapo": "AlphaPO is `rlhfkit cpo "
            "loss_type=simpo alphapo_alpha=A rpo_alpha=0` here (no reference; TRL's alpha and cpo_alpha)"}


def loss_forms(spec: str) -> tuple[tuple[str, float], ...]:
    """``loss_type`` as ((name, weight), ...): "sigmoid" is (("sigmoid", 1.0),), and
    "sigmoid:0.8,nca_pair:0.2" weighs two forms (TRL's ``loss_type`` list and ``loss_weights``)."""
    forms = []
    for item in (s.strip() for s in str(spec).split(",")):
        name, _, weight = (part.strip() for part in item.partition(":"))
        if name in NOT_HERE:
            raise ConfigError(f"config key 'loss_type': {name} is TRL's; {NOT_HERE[name]}")
        choice("loss_type", name, tuple(PAIR_LOSSES))
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf") or name in dict(forms):
            raise ConfigError(f"config key 'loss_type': {item!r} must be name[:weight] with a weight > 0, "
                              "each name once (e.g. sigmoid:0.8,nca_pair:0.2)")
        forms.append((name, value))
    return tuple(forms)


def pairwise_only(cfg: DPOConfig) -> str | None:
    """The setting that makes the loss one for pairs, or None: anything but the paper's sigmoid,
    unsmoothed, on plain log-ratios (whose Plackett-Luce form takes rankings of any length)."""
    kl = cfg.f_divergence_type == "reverse_kl" or (cfg.f_divergence_type == "alpha_divergence"
                                                   and abs(cfg.f_alpha_divergence_coef - 1) < 1e-6)  # its limit
    for key, plain in (("loss_type", loss_forms(cfg.loss_type) == (("sigmoid", 1.0),)),
                       ("label_smoothing", cfg.label_smoothing == 0), ("f_divergence_type", kl),
                       ("ld_alpha", cfg.ld_alpha in (None, 1.0)), ("use_weighting", not cfg.use_weighting)):
        if not plain:
            return f"{key}={getattr(cfg, key)}"
    return None


@dataclass(frozen=True)
class DPOLoss:
    """What DPO's objective reads of its config (``DPOConfig``'s fields of the same names, the
    forms and their settings in losses/dpo.py): ``DPOLoss.of(cfg)``."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0  # > 0: RPO's NLL of the best answers (losses/dpo.py ``chosen_nll``)
    alphapo_alpha: float = 0.0  # AlphaPO's reward shape (losses/dpo.py ``Pairs.shaped``)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None  # LD-DPO's sums (``ld_weights``); precomputed reference log-probs must be too
    use_weighting: bool = False  # WPO's pair weights
    reference: str = "precompute"  # none: the rewards of per-token forms are per token (``per_token_rewards``)

    @classmethod
    def of(cls, cfg) -> DPOLoss:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def dpo_objective(settings: DPOLoss, reference: Reference | None = None, router_coef: float = 0.0,
                  shift: RewardShift | None = None) -> Objective:
    """``reference=None``: the batch carries precomputed reference log-probs; else the frozen
    reference (models/lora.py ``Reference``) is forwarded on every batch. ``settings``: the loss
    (``DPOLoss``). ``router_coef`` > 0 adds a mixture of experts' router balancing loss of the
    policy's forward. ``shift``: bco_pair's delta (``RewardShift``), given the answers' rewards."""
    beta, ld_alpha, use_weighting = settings.beta, settings.ld_alpha, settings.use_weighting
    forms = loss_forms(settings.loss_type)
    pairs_only = pairwise_only(settings)
    per_token_rewards = per_token_reward(settings)

    def counts(batch) -> dict:
        best = batch.slot % batch.mask.shape[1] == 0  # (N,) the chosen / best-ranked outputs
        return {"prompts": batch.num_prompts, "pairs": count_pairs(batch),
                "chosen_tokens": batch.output_lengths()[best].sum().item(), "forwards": 1}

    def loss(model, batch, totals):
        with router_balance(model, router_coef) as balance:  # the policy's forward (a LoRA reference is the same model)
            out = output_logps(model, batch, ld_alpha, aligned=use_weighting)
            logps = batch.grid(out.sums)  # (P, K)
        if reference is None:
            ref = batch.ref_logps
        else:
            with torch.no_grad(), reference() as ref_model:
                ref = batch.grid(sequence_logps(ref_model, batch, ld_alpha))
        weights = None  # WPO's, pair by pair (pairs only)
        if batch.mask.shape[1] == 2:  # plain pairs: the paper's pairwise loss
            per_token = per_token_rewards or any(name in PER_TOKEN for name, _ in forms)
            lengths = batch.grid(batch.output_lengths().to(logps.dtype)).unbind(-1) if per_token else None
            weights = wpo_weights(batch.grid(out.aligned)).prod(-1) if use_weighting else None  # (P,) w(y_w) w(y_l)
            value, sums = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta, totals["prompts"],
                                   forms, settings.label_smoothing, lengths, settings.discopop_tau, settings.f_divergence_type,
                                   settings.f_alpha_divergence_coef, weights, settings.simpo_gamma, per_token_rewards,
                                   settings.alphapo_alpha, shift.mean if shift is not None else 0.0)
            if shift is not None:
                shift.add(beta * (logps - ref))
        else:  # rankings of more than two (run_dpo refuses them with their rows for the pairwise-only forms)
            if pairs_only:
                raise ValueError(f"a ranking of {batch.mask.shape[1]} answers has the Plackett-Luce loss only; "
                                 f"{pairs_only} is for pairs")
            value, sums = plackett_luce_loss(logps, ref, batch.mask, beta, totals["prompts"])
        prompts = max(totals["prompts"], 1.0)
        metrics = {k: sums[k] / prompts for k in ("rewards_chosen", "rewards_rejected", "margin",
                                                    "logps_chosen", "logps_rejected")}
        metrics["preference_accuracy"] = sums["correct"] / max(totals["pairs"], 1.0)
        metrics.update({k: sums[k] / prompts for k in ("log_odds_chosen", "log_odds_ratio") if k in sums})  # ORPO's
        if shift is not None:  # each micro-batch's share of the step's delta: the sum over ranks is delta
            metrics["reward_shift"] = torch.tensor(shift.mean * batch.num_prompts / max(totals["prompts"], 1.0))
        if use_weighting:  # the pairs' WPO weights, a mean over all ranks' pairs
            metrics["pair_weight"] = weights.sum() / max(totals["prompts"], 1.0)
        if settings.rpo_alpha > 0:
            chosen = batch.grid(out.plain)[:, 0]  # every token's, LD-DPO or not
            if weights is not None:  # WPO weighs RPO's term too, pair by pair, as TRL weighs its sft term
                chosen = chosen * weights
            nll = chosen_nll(chosen, totals["chosen_tokens"])
            value = value + settings.rpo_alpha * nll
            # the plain NLL (with use_weighting the loss's term is weighed pair by pair)
            plain = nll if weights is None else chosen_nll(batch.grid(out.plain)[:, 0], totals["chosen_tokens"])
            metrics["nll_chosen"] = plain.detach()
        return balance.add_to(value, metrics, 1 / totals["forwards"]), metrics

    return Objective(counts, loss)


def per_token_reward(cfg) -> bool:
    """Whether the implicit reward is per token: with no reference and per-token forms only (SimPO's
    and ORPO's reward is the answer's mean log-prob, as TRL's CPOTrainer and ORPOTrainer log it)."""
    return cfg.reference == "none" and all(name in PER_TOKEN for name, _ in loss_forms(cfg.loss_type))


def trainable_rankings(rows: list[Row], cfg: DPOConfig | None = None) -> list[Row]:
    """Rankings DPO can train on: a strict order, and with a pairwise-only loss (``cfg``'s
    ``pairwise_only``) no more than two answers."""
    pairs_only = cfg is not None and pairwise_only(cfg)
    for row in rows:
        ranks = row.data.get("ranks")
        if isinstance(ranks, list) and len(set(map(str, ranks))) != len(ranks):
            raise DataError(f"{row.where}: field 'ranks' has ties; DPO's Plackett-Luce loss needs a strict order "
                            "(the reward model, `rlhfkit rm`, accepts ties)")
        answers = row.data.get("completions")
        if pairs_only and isinstance(answers, list) and len(answers) > 2:
            raise DataError(f"{row.where}: field 'completions' ranks {len(answers)} answers; {pairs_only} is for "
                            "pairs (rankings of more than two take the Plackett-Luce loss of plain DPO)")
    return rows


def sft_on_chosen(model, tokenizer, examples, cfg: DPOConfig, resuming: bool, router_coef: float = 0.0) -> str:
    """SPEC.md: with no SFT model, first maximise the likelihood of the preferred answers.

    The tuned model is saved to ``<out>/sft_chosen/model``: it is DPO's reference, and a resumed
    run reloads it from there rather than rebuilding it from the untuned model. The phase is a
    run of its own in that folder, with checkpoints on DPO's cadence: killed inside it, a run
    with ``resume=true`` or ``auto`` continues it from its last complete checkpoint."""
    folder = f"{cfg.train.out_dir}/sft_chosen"
    if resuming:
        if not ((Path(folder) / "model" / "config.json").is_file() or is_adapter_folder(f"{folder}/model")):
            raise CheckpointError(f"resume=true with sft_first_steps > 0 but {folder}/model is missing")
        return f"{folder}/model"
    sft_cfg = replace(cfg.train, out_dir=folder, max_steps=cfg.sft_first_steps, epochs=0, eval_every=0,
                      resume=("force" if cfg.train.resume == "force" else "auto") if cfg.train.resume else False)
    run = start_run(sft_cfg, cfg, "dpo-sft")
    chosen = [SFTExample(e.prompt_ids + e.completion_ids[0], len(e.prompt_ids)) for e in examples]
    train_offline(run, model, chosen, lambda rows: collate_sft(rows, tokenizer.pad_token_id),
                  sft_objective(router_coef))
    run.finish(model, tokenizer, {})
    return f"{folder}/model"


def run_dpo(cfg: DPOConfig) -> dict:
    run = start_run(cfg.train, cfg, type(cfg).__name__.removesuffix("Config").lower())  # dpo, cpo or orpo
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    pad = tokenizer.pad_token_id
    examples, report = encode_rankings(trainable_rankings(read_rows(cfg.train_data), cfg), tokenizer, cfg.max_length,
                                       cfg.overlong, method=run.name)
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    pref_rows = (trainable_rankings(head(read_rows(cfg.eval_data), cfg.eval_limit, run.say, cfg.eval_data))
                 if cfg.eval_data else [])
    pref_examples, eval_report = [], None
    if pref_rows:
        pref_examples, eval_report = encode_rankings(pref_rows, tokenizer, cfg.max_length, "skip")
        run.say(f"{source_name(cfg.eval_data)} (held out, over-long rows skipped): {eval_report.summary()}")
    prompts = held_out(cfg.eval_prompts, cfg.eval_limit, cfg.eval_task, run.say)
    # dropout off (as TRL's disable_dropout): the implicit rewards compare the policy with its frozen copy (or itself)
    model = run.prepare(load_causal_lm(cfg.model, tokenizer, device=run.device), cfg.lora,
                        base=cfg.model, router_loss=True, dropout=False)
    check_positions(run, model, longest(report, eval_report))
    check_positions(run, model, longest_prompt(prompts, tokenizer), cfg.eval_max_new_tokens)
    backend = SamplerBackend(tokenizer, model, copy=run.shards_models)  # a copy is made before sharding
    # The frozen start: the policy with its adapters off (LoRA), else a copy made before sharding; after
    # an SFT phase on the chosen answers, the tuned model saved by that phase.
    free = cfg.reference == "none"  # no reference model at all (CPO, SimPO, ORPO)
    reference = (frozen_reference(run, model, cfg.model, tokenizer, cfg.lora.enabled)
                 if not (cfg.sft_first_steps or free) else None)
    run.shard(model)
    if cfg.sft_first_steps > 0:
        start = sft_on_chosen(model, tokenizer, examples, cfg, run.resuming, run.router_coef)
        reference = None if free else frozen_reference(run, model, start, tokenizer, from_adapters=False)
    if free:
        examples, pref_eval = no_reference(examples), no_reference(pref_examples)
    else:
        with reference() as ref_model:
            pref_eval = precompute_reference(ref_model, pref_examples, pad) if pref_examples else []
    accuracy = accuracy_eval(backend, model, tokenizer, prompts, cfg.eval_max_new_tokens)
    per_token = per_token_reward(cfg)  # SimPO's and ORPO's reward: the mean log-prob
    # the start model's, kept in the checkpoints: a run resumed after the SFT phase holds the untuned model here
    before = run.state.get("before") or {
        "accuracy_before": run.start_eval(accuracy())["accuracy"] if prompts else None,  # 0.5 below, policy == ref (none: log pi)
        "preference_accuracy_before": preference_accuracy(model, pref_eval, pad, per_token=per_token) if pref_eval else None}
    run.keep["before"] = before
    if cfg.reference == "precompute":  # under the trained forward's autocast, as a forwarded reference is
        with reference() as ref_model, autocast(cfg.train.dtype, run.device):
            examples = precompute_reference(ref_model, examples, pad, ld_alpha=cfg.ld_alpha)
        reference = None  # no reference model in memory
        run.say("reference log-probs precomputed once; the reference model is released")

    sync = reference_sync(cfg, reference, model, run)  # TR-DPO; the checkpoints then hold the moved reference
    shift = RewardShift(run) if "bco_pair" in dict(loss_forms(cfg.loss_type)) else None  # BCO's delta

    def after_step(done: int) -> None:
        if shift is not None:
            shift.update(done)
        if sync is not None:
            sync(done)

    def evaluate(model) -> dict:
        held = pref_eval
        if sync is not None and held:  # TR-DPO: the implicit reward against the reference as it now is (TRL's)
            with reference() as ref_model:
                held = precompute_reference(ref_model, pref_examples, pad)
        out = {"preference_accuracy": preference_accuracy(model, held, pad, per_token=per_token)} if held else {}
        return {**out, **(accuracy() if prompts else {})}

    train_offline(run, model, examples, ranking_collate(model, pad, cfg.share_prompt),
                  dpo_objective(DPOLoss.of(cfg), reference, run.router_coef, shift),
                  evaluate if (pref_eval or prompts) else None, after_step=after_step,
                  kept={"reference": reference.module} if sync else None)
    summary = {"loss": run.metrics.get("loss"), "reference": cfg.reference, "length_report": report.summary(), **before}
    if run.evals:
        summary.update({k: v for k, v in run.evals[-1].items() if k != "step"})
    return run.finish(model, tokenizer, summary)
