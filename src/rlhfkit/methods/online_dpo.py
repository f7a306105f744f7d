"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
Algorithm 1; TRL's OnlineDPOTrainer): DPO on pairs the policy samples as it trains, judged as
they are drawn.

Reads top to bottom, one rollout step at a time: the rollout backend samples two answers per
prompt from the current policy -> the rewards score both (rule functions or ``rm:PATH``, GRPO's
syntax; the paper's annotator is an LLM, TRL's a reward model or functions) -> the better one is
chosen, the other rejected -> one optimizer step of DPO's loss on those pairs, with the frozen
start model as the reference (methods/dpo.py's objective: the same forms, one forward of each
prompt with both answers, micro-batched with ``train.micro_batch_size`` pairs a forward).

    L = -log sigma( beta log(pi(y+|x) / pi_ref(y+|x)) - beta log(pi(y-|x) / pi_ref(y-|x)) )

Log-probs are of the policy itself (temperature 1), whatever the sampling temperature, as TRL's.
A pair whose two answers score alike carries no preference: ``ties=skip`` (the default) leaves it
out of the step and logs the share (``tied_pairs``); ``ties=first`` takes the first answer as the
chosen one, as TRL does. A pair the rewards did not judge (``pair_scores``) is left out either way,
and a step with no pair left on any rank takes no optimizer step (``update_skipped``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..data.encode import to_device
from ..data.prefs import RankingExample
from ..losses.dpo import REFERENCE_FREE, SORTED
from ..models.load import load_causal_lm, load_tokenizer
from ..rollout.backend import SamplingParams, make_backend
from ..rollout.evaluate import row_prompt_ids
from ..tasks import TASK_CHOICES
from ..train.config import (
    ConfigError,
    LoraConfig,
    RolloutConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    choice,
    positive,
    within,
)
from ..train.dist import all_gather_object
from ..train.loop import BatchOrder, reduce_dict, step_on
from ..train.optim import build_optimizer, build_scheduler
from ..train.run import start_run
from .common import (
    OFFLINE_BATCH,
    accuracy_eval,
    check_positions,
    frozen_reference,
    longest_prompt,
    ranking_collate,
    refuse_offline_batch_fields,
    say_foreign_ids,
    say_generation_config,
)
from .dpo import DPOLoss, dpo_objective, loss_forms
from .online_rewards import (
    RewardErrors,
    RewardKeys,
    check_learned_rewards,
    load_model_rewards,
    parse_rewards,
    prompt_rows,
    recorded_config,
    replaced_rewards,
    resolve_rewards,
    reward_stats,
    score_samples,
)

TIES = ("skip", "first")
# DPO's forms that read a setting online DPO does not take (robust without label_smoothing is sigmoid)
NEEDS_A_SETTING = {"simpo": "simpo_gamma", "exo_pair": "label_smoothing", "robust": "label_smoothing"}


@dataclass(frozen=True)
class OnlineDPOConfig:
    UNREAD = OFFLINE_BATCH  # not a field: keys a config file or override may not set
    model: str = ""  # the SFT model: the policy starts here, and its frozen copy is the reference
    tokenizer: str | None = None
    train_data: str = ""  # prompts (prompt or messages, and the fields the rewards read, e.g. answer)
    eval_data: str | None = None  # held-out prompts: accuracy of greedy answers (checked by eval_task)
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    eval_limit: int = 500  # held-out prompts used; 0 = all
    eval_max_new_tokens: int = 32
    # how each pair is judged: "name[:weight],...", GRPO's syntax (shipped tasks/ rewards, rm:PATH, module:function)
    rewards: str = "exact_answer"
    reward_errors: str = "raise"  # raise | zero (score 0, count, and say each reward's first error once)
    reward_timeout_s: float = 0.0  # > 0: a reward call that takes longer is an error (named); 0 = no limit
    ties: str = "skip"  # two answers scored alike: skip (no preference, left out) | first (TRL's: the first is chosen)
    missing_eos_penalty: float | None = None  # > 0: subtracted from the score of an answer cut at max_new_tokens
    beta: float = 0.1
    # sigmoid (the paper's) or another form of losses/dpo.py with a reference (ipo: TRL's other); several weighed
    # together as "name:weight,name:weight", as DPO's
    loss_type: str = "sigmoid"
    prompts_per_step: int = 16  # over all ranks; two answers each
    max_new_tokens: int = 16
    temperature: float = 0.9  # sampling only (TRL's default): the loss reads the policy's own log-probs
    top_k: int = 0
    top_p: float = 1.0
    share_prompt: bool = True  # forward each prompt once for both answers (block mask; SDPA attention only)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # rollout.backend: sampler | generate | vllm
    lora: LoraConfig = field(default_factory=LoraConfig)  # with adapters the reference is the base (adapters off)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/online_dpo"))

    def __post_init__(self):
        choice("ties", self.ties, TIES)
        choice("reward_errors", self.reward_errors, ("raise", "zero"))
        choice("eval_task", self.eval_task, TASK_CHOICES)
        names = [name for name, _ in loss_forms(self.loss_type)]
        if refused := [n for n in names if n in REFERENCE_FREE or n in NEEDS_A_SETTING]:
            raise ConfigError(f"loss_type={','.join(refused)}: online DPO takes DPO's forms against its reference "
                              f"that need no setting of their own ({', '.join(REFERENCE_FREE)} reads no reference; "
                              + "; ".join(f"{k} needs {v}" for k, v in NEEDS_A_SETTING.items())
                              + ", not keys here)", keys=["loss_type"])
        if "bco_pair" in names:
            raise ConfigError("loss_type=bco_pair keeps a running reward shift across the steps of `rlhfkit dpo`'s "
                              "loop; online DPO takes the forms that need no state of their own", keys=["loss_type"])
        if sorted_forms := [n for n in names if n in SORTED]:
            raise ConfigError(f"loss_type={','.join(sorted_forms)} (AOT) compares the distributions of a batch's pairs, "
                              "and online DPO's judged pairs vary in number each step (ties left out), down to one, "
                              "where it is the sigmoid: not offered (TRL's online DPO has sigmoid and ipo)",
                              keys=["loss_type"])
        if not parse_rewards(self.rewards)[0]:  # names and rm: folders checked now, before any model loads
            raise ConfigError("config key 'rewards' names no reward: online DPO judges each pair by its rewards "
                              "(e.g. exact_answer, rm:PATH, module:function)", keys=["rewards"])
        positive("beta", self.beta)
        positive("temperature", self.temperature, " (online DPO samples its pairs: greedy answers would be alike)")
        for key in ("prompts_per_step", "max_new_tokens", "eval_max_new_tokens"):
            at_least(key, getattr(self, key), 1)
        for key in ("top_k", "eval_limit", "reward_timeout_s"):
            at_least(key, getattr(self, key), 0)
        within("top_p", self.top_p, 0, 1, open_low=True)
        if self.missing_eos_penalty is not None:
            positive("missing_eos_penalty", self.missing_eos_penalty)
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "eval_task", "train.eval_every"),
                           bool(self.eval_data), "held-out evaluation (eval_data)")


def judged_pairs(samples, prompt_ids: list, scores: torch.Tensor, ties: str) -> tuple[list, list[bool]]:
    """The two answers of each prompt (consecutive rows of ``samples``) as a ``RankingExample``
    pair, the better-scored first; with ``ties=skip`` a pair scored alike is left out, and a pair
    with a NaN score (not judged: see ``pair_scores``) is left out whatever ``ties`` says. Returns
    the pairs and, per prompt, whether it was tied or not judged."""
    ids, mask = samples.completion_ids.tolist(), samples.completion_mask.tolist()
    answers = [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]
    pairs, tied = [], []
    for p, prompt in enumerate(prompt_ids):
        a, b = 2 * p, 2 * p + 1
        unjudged = bool(scores[a].isnan() or scores[b].isnan())
        tie = unjudged or bool(scores[a] == scores[b])
        tied.append(tie)
        if unjudged or (tie and ties == "skip"):
            continue
        first, second = (a, b) if scores[a] >= scores[b] else (b, a)
        pairs.append(RankingExample(list(prompt), [answers[first], answers[second]], [0, 1]))
    return pairs, tied


def answer_scores(outcome, finished: torch.Tensor, missing_eos_penalty: float | None) -> torch.Tensor:
    """Each answer's score: the rewards' weighted sum (NaN where every reward abstained), less
    TRL's ``missing_eos_penalty`` where the answer did not end."""
    scores = outcome.rewards.clone()
    if missing_eos_penalty is not None:
        scores[~finished.cpu()] -= missing_eos_penalty
    return scores


def pair_scores(scores: torch.Tensor, outcome) -> torch.Tensor:
    """``scores`` for judging pairs: NaN for both answers of a pair that a reward abstained on
    (returned None) for one answer only, whose sums would be over different rewards, or where a
    reward gave one of them no number (``reward_errors=zero`` scores it 0: a preference of its own;
    a reward that raised on the batch gave none to any, so no pair of the batch is judged)."""
    scores = scores.clone()
    unjudged = torch.zeros(len(scores) // 2, dtype=torch.bool)
    for values in outcome.per_function.values():
        gone = torch.as_tensor(values).isnan()
        unjudged |= gone[0::2] != gone[1::2]
    if outcome.errored is not None:
        unjudged |= outcome.errored[0::2] | outcome.errored[1::2]
    scores[0::2][unjudged] = scores[1::2][unjudged] = float("nan")
    return scores


def judge(backend, tokenizer, rows: list, cfg: OnlineDPOConfig, rewards, trainer_state) -> dict:
    """Sample two answers per prompt row and score them: the pairs (``judged_pairs``), every
    answer's score, and the step's counts (sums over this rank's answers, to be summed over ranks)."""
    start = time.time()
    prompt_ids = row_prompt_ids(tokenizer, rows)
    samples = backend.generate(prompt_ids, SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                                          cfg.top_p, num_samples=2))
    generation_s = time.time() - start
    outcome = score_samples(tokenizer, samples, rows, 2, rewards, cfg.reward_errors, cfg.reward_timeout_s,
                            trainer_state).outcome
    scores = answer_scores(outcome, samples.finished, cfg.missing_eos_penalty)
    judging = pair_scores(scores, outcome)
    pairs, tied = judged_pairs(samples, prompt_ids, judging, cfg.ties)
    gaps = (judging[0::2] - judging[1::2]).abs()
    counts = {"answers": len(scores), "prompts": len(tied), "tied": sum(tied), "pairs": len(pairs),
              "gap": float(gaps.nansum()), "judged": float((~gaps.isnan()).sum()),
              "clipped": float((~samples.finished).sum()), "tokens": float(samples.completion_mask.sum())}
    return {"pairs": pairs, "scores": scores, "outcome": outcome, "counts": counts, "time_generation_s": generation_s,
            "samples": samples}


def judged_metrics(judged: dict, info) -> dict:
    """The step's statistics over every rank's answers: the rewards' (``reward_stats``: the scores
    after ``missing_eos_penalty``), the shares of tied prompts and of answers cut off, the mean
    score gap of the judged pairs, and how many pairs the step trains on (``pairs``)."""
    counts = reduce_dict(judged["counts"], info)
    outcome = judged["outcome"]
    out, _ = reward_stats(judged["scores"], outcome.per_function, outcome.errors, info)
    n, prompts = max(counts["answers"], 1.0), max(counts["prompts"], 1.0)
    return {**out, "tied_pairs": counts["tied"] / prompts, "score_gap": counts["gap"] / max(counts["judged"], 1.0),
            "completion_clipped": counts["clipped"] / n, "completion_len_mean": counts["tokens"] / n,
            "pairs": counts["pairs"]}


def dpo_step(run, policy, pairs: list, objective, collate) -> tuple[dict, float]:
    """One optimizer step of DPO's loss on the step's pairs of every rank, dealt out afresh so that
    each rank forwards about as many, ``train.micro_batch_size`` pairs a forward. A rank dealt fewer
    micro-batches than another (or none) forwards one pair more times at zero weight: under FSDP2
    every forward and backward is a collective, so every rank runs as many. Returns the step's
    metric shares (with ``loss``) and the gradient norm."""
    everyone = [p for part in all_gather_object(pairs, run.info) for p in part]
    mine = everyone[run.info.rank::run.info.world_size]
    per_rank = -(-len(everyone) // run.info.world_size)  # the most pairs a rank is dealt
    micro = run.cfg.micro_batch_size or per_rank
    batches = [to_device(collate(mine[j: j + micro]), run.device) for j in range(0, len(mine), micro)]
    most = -(-per_rank // micro)  # the busiest rank's forwards
    fillers = most - len(batches) if run.shards_models else int(not batches)
    idle = [to_device(collate(everyone[:1]), run.device)] * fillers if fillers else []
    loss, shares, grad_norm = step_on(run, policy, batches, objective, idle)
    return {"loss": loss, **shares}, grad_norm


def run_online_dpo(cfg: OnlineDPOConfig, reward_fns: list | None = None, weights: list[float] | None = None,
                   backend=None) -> dict:
    """Train with online DPO. Python callers may pass their own reward callables (with ``weights``)
    and a rollout backend object (rollout/backend.py) in place of ``rollout.backend``'s."""
    if reward_fns is not None and not reward_fns:
        raise ConfigError("reward_fns=[] passes no reward: online DPO judges each pair by its rewards")
    keys = RewardKeys(cfg.rewards, OnlineDPOConfig.rewards, micro_batch_size=cfg.train.micro_batch_size)
    rewards = resolve_rewards(keys, reward_fns, weights)
    refuse_offline_batch_fields("online_dpo", cfg.train)
    tc = cfg.train
    run = start_run(tc, recorded_config(cfg, rewards, reward_fns is not None, caller="run_online_dpo"), "online_dpo",
                    unit="rollout step", show=("reward_mean",))
    for line in replaced_rewards(keys, reward_fns is not None, caller="run_online_dpo"):
        run.say(line)
    if cfg.prompts_per_step % run.info.world_size:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must divide over {run.info.world_size} ranks")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    rows, eval_rows, report = prompt_rows(run, cfg, tokenizer, rewards.functions)  # every row, before any model loads
    policy = run.prepare(load_causal_lm(cfg.model, tokenizer, device=run.device), cfg.lora,
                         base=cfg.model, router_loss=True, dropout=False)
    check_positions(run, policy, report.longest, cfg.max_new_tokens)
    check_positions(run, policy, longest_prompt(eval_rows, tokenizer), cfg.eval_max_new_tokens)
    rewards = load_model_rewards(keys, rewards, tokenizer, run.device)
    retokenised = check_learned_rewards(run, rewards, rows, report.longest, cfg.max_new_tokens)
    reference = frozen_reference(run, policy, cfg.model, tokenizer, cfg.lora.enabled)
    backend = backend or make_backend(cfg.rollout, tokenizer, policy, copy=run.shards_models, out_dir=tc.out_dir)
    run.shard(policy)
    say_generation_config(run, policy, tokenizer, SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                                                 cfg.top_p), cfg.model)
    evaluate = accuracy_eval(backend, policy, tokenizer, eval_rows, cfg.eval_max_new_tokens)
    before = run.start_eval(evaluate()) if evaluate else {}
    optimizer = build_optimizer(policy, tc.lr, tc.weight_decay)
    total = run.plan(len(rows), cfg.prompts_per_step, "prompts", "prompts_per_step")
    run.attach(policy, optimizer, build_scheduler(optimizer, total, tc.warmup_steps, tc.schedule, tc.min_lr_ratio))
    order = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed)
    objective = dpo_objective(DPOLoss(beta=cfg.beta, loss_type=cfg.loss_type, reference="forward"), reference,
                              run.router_coef)
    collate = ranking_collate(policy, tokenizer.pad_token_id, cfg.share_prompt)
    said, errors = False, RewardErrors(run)
    for step in run.steps(evaluate):
        sync = time.time()
        backend.load_weights(policy)  # a sharded policy: the gathered full weights into the backend's copy
        sync = time.time() - sync
        mine = [rows[i] for i in order.indices(step)[run.info.rank::run.info.world_size]]
        judged = judge(backend, tokenizer, mine, cfg, rewards,
                       SimpleNamespace(global_step=run.optimizer_steps, max_steps=total))  # TRL's names
        errors.first(run, judged["outcome"])
        say_foreign_ids(run, judged["samples"], tokenizer)
        means = {**judged_metrics(judged, run.info), **retokenised, "time_generation_s": judged["time_generation_s"],
                 "time_weight_sync_s": sync}
        shares = {}
        if means["pairs"] > 0:
            shares, means["grad_norm"] = dpo_step(run, policy, judged["pairs"], objective, collate)
        elif not said:
            said = True
            run.say(f"rollout step {step + 1}: every pair of every rank tied or was not judged, so it takes no "
                    "optimizer step (update_skipped; tied_pairs says how many tie); said once a run")
        means["update_skipped"] = float(means.pop("pairs") == 0)  # every pair tied or unjudged: no step
        errors.count(means)  # before step_done: its checkpoint holds the totals with this step's
        run.step_done(means=means, shares=shares, evaluate=evaluate)
    if run.optimizer_steps == 0 and run.done:
        run.say(f"warning: no step of this run changed the weights: every pair of its {run.done} rollout steps tied "
                "or was not judged (a reward that cannot tell two answers apart; see tied_pairs)")
    summary = {"accuracy_before": before.get("accuracy"), "reward_mean": run.metrics.get("reward_mean"),
               **errors.summary(run)}
    if run.evals:
        summary["accuracy"] = run.evals[-1]["accuracy"]
    return run.finish(policy, tokenizer, summary)
