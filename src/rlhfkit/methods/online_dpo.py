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
chosen one, as TRL does. A step with no untied pair on any rank takes no optimizer step
(``update_skipped``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..data.encode import check_prompts
from ..data.formats import user_prompt
from ..data.prefs import RankingExample
from ..data.rows import read_rows, source_name
from ..models.load import disable_dropout, load_causal_lm, load_tokenizer
from ..rollout.backend import SamplingParams, make_backend
from ..rollout.evaluate import row_prompt_ids
from ..rollout.rewards import RESERVED, as_completions, reward_fields, score_outcomes
from ..rollout.sampler import decode
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
from ..train.loop import BatchOrder, Objective, _sum_dicts, accumulate, reduce_dict
from ..train.optim import build_optimizer, build_scheduler
from ..train.run import start_run
from .common import (
    accuracy_eval,
    check_positions,
    frozen_reference,
    held_out,
    longest_prompt,
    ranking_collate,
    refuse_offline_batch_fields,
)
from .dpo import DPOLoss, dpo_objective, loss_forms
from .grpo_rewards import Rewards, load_model_rewards, parse_rewards

TIES = ("skip", "first")


@dataclass(frozen=True)
class OnlineDPOConfig:
    model: str = ""  # the SFT model: the policy starts here, and its frozen copy is the reference
    tokenizer: str | None = None
    train_data: str = ""  # prompts (prompt or messages, and the fields the rewards read, e.g. answer)
    eval_data: str | None = None  # held-out prompts: accuracy of greedy answers (checked by eval_task)
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    eval_limit: int = 500  # held-out prompts used; 0 = all
    eval_max_new_tokens: int = 32
    # how each pair is judged: "name[:weight],...", GRPO's syntax (shipped tasks/ rewards, rm:PATH, module:function)
    rewards: str = "exact_answer"
    reward_errors: str = "raise"  # raise | zero (score 0 and count)
    reward_timeout_s: float = 0.0  # > 0: a reward call that takes longer is an error (named); 0 = no limit
    ties: str = "skip"  # two answers scored alike: skip (no preference, left out) | first (TRL's: the first is chosen)
    missing_eos_penalty: float | None = None  # > 0: subtracted from the score of an answer cut at max_new_tokens
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (the paper's) or another form of losses/dpo.py (ipo: TRL's other)
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
        if refused := [n for n in names if n in ("orpo", "exo_pair")]:
            raise ConfigError(f"loss_type={','.join(refused)}: online DPO takes DPO's forms against its reference "
                              "that need no other setting (orpo reads no reference; exo_pair needs label_smoothing)",
                              keys=["loss_type"])
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
    with an answer every reward abstained on (a NaN score) is left out whatever ``ties`` says: it
    is not judged. Returns the pairs and, per prompt, whether it was tied or unjudged."""
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


def judge(backend, tokenizer, rows: list, cfg: OnlineDPOConfig, rewards: Rewards, trainer_state) -> dict:
    """Sample two answers per prompt row and score them: the pairs (``judged_pairs``) and the step's
    statistics (sums over this rank's answers, to be summed over ranks)."""
    start = time.time()
    prompt_ids = row_prompt_ids(tokenizer, rows)
    samples = backend.generate(prompt_ids, SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                                          cfg.top_p, num_samples=2))
    generation_s = time.time() - start
    prompts = [user_prompt(r) for r in rows for _ in range(2)]
    keys = sorted({k for r in rows for k in r.data} - {"prompt", "messages"})
    fields = {k: [r.data.get(k) for r in rows for _ in range(2)] for k in keys}
    eos, mask = tokenizer.eos_token_id, samples.completion_mask.bool()
    ended = ((samples.completion_ids == eos) & mask).any(-1).cpu()
    ids = [[t for t, m in zip(row, keep) if m and t != eos]
           for row, keep in zip(samples.completion_ids.tolist(), mask.tolist())]
    per_sample = [r for r in rows for _ in range(2)]
    bound = [f.bind(samples, per_sample) if hasattr(f, "bind") else f for f in rewards.functions]
    outcome = score_outcomes(bound, rewards.weights, prompts, as_completions(decode(tokenizer, samples), prompts),
                             fields, cfg.reward_errors, cfg.reward_timeout_s, completion_ids=ids,
                             trainer_state=trainer_state)
    scores = outcome.rewards.clone()
    if cfg.missing_eos_penalty is not None:  # TRL's: an answer cut at max_new_tokens scores less
        scores[~ended] -= cfg.missing_eos_penalty
    pairs, tied = judged_pairs(samples, prompt_ids, scores, cfg.ties)
    scored, gaps = scores[~scores.isnan()], (scores[0::2] - scores[1::2]).abs()
    sums = {"answers": len(scores), "scored": len(scored), "score": float(scored.sum()),
            "score_sq": float((scored ** 2).sum()), "prompts": len(tied), "tied": sum(tied), "pairs": len(pairs),
            "gap": float(gaps.nansum()), "judged": float((~gaps.isnan()).sum()), "clipped": float((~ended).sum()),
            "tokens": float(mask.sum())}
    for name, values in outcome.per_function.items():  # NaN where the reward abstained (returned None)
        present = torch.as_tensor(values, dtype=torch.float64)
        present = present[~present.isnan()]
        sums.update({f"reward/{name}": float(present.sum()), f"reward/{name}#n": len(present),
                     f"reward/{name}_errors": outcome.errors.get(name, 0)})
    return {"pairs": pairs, "sums": sums, "time_generation_s": generation_s}


def judged_metrics(sums: dict) -> dict:
    """The step's statistics over all ranks' answers and prompts (``judge``'s sums, summed over ranks)."""
    n, scored, prompts = max(sums["answers"], 1.0), sums["scored"], max(sums["prompts"], 1.0)
    mean = sums["score"] / scored if scored else float("nan")  # every reward abstained on every answer: NaN
    var = max(sums["score_sq"] / max(scored, 1.0) - mean ** 2, 0.0) * scored / max(scored - 1, 1.0)  # torch's std
    out = {"reward_mean": mean, "reward_std": var ** 0.5 if scored > 1 else 0.0, "tied_pairs": sums["tied"] / prompts,
           "score_gap": sums["gap"] / max(sums["judged"], 1.0), "completion_clipped": sums["clipped"] / n,
           "completion_len_mean": sums["tokens"] / n}
    for key in [k for k in sums if k.startswith("reward/") and "#" not in k and not k.endswith("_errors")]:
        count = sums[f"{key}#n"]
        out[f"{key}_mean"] = sums[key] / count if count else float("nan")
        out[f"{key}_errors"] = sums[f"{key}_errors"]
    return out


def dpo_step(run, policy, pairs: list, objective, collate, micro_batch_size: int, dtype: str) -> tuple[dict, float]:
    """One optimizer step of DPO's loss on the step's pairs of every rank, dealt out afresh so that
    each rank forwards about as many (a rank dealt none forwards one pair at zero weight: every rank
    joins the backward's collectives). Returns the step's metric shares, with ``loss``."""
    everyone = [p for part in all_gather_object(pairs, run.info) for p in part]
    mine = everyone[run.info.rank::run.info.world_size]
    micro = micro_batch_size or max(len(mine), 1)  # pairs a forward (0: all of this rank's)
    batches = [collate(mine[j: j + micro]) for j in range(0, len(mine), micro)] or [collate(everyone[:1])]
    counted = _sum_dicts(objective.counts(b) for b in batches) if mine else {k: 0.0 for k in
                                                                              objective.counts(batches[0])}
    totals = reduce_dict(counted, run.info)
    weight = 1.0 if mine else 0.0
    loss, sums = accumulate(policy, batches, scaled(objective, weight), totals, dtype, run.device)
    _, grad_norm = run.optimizer_step(loss)
    return {"loss": loss, **sums}, grad_norm


def scaled(objective: Objective, weight: float) -> Objective:
    """``objective`` with its loss and metrics times ``weight`` (0: a forward that counts for nothing)."""
    if weight == 1.0:
        return objective

    def loss(model, batch, totals):
        value, metrics = objective.loss(model, batch, totals)
        return value * weight, {k: v * weight for k, v in metrics.items()}

    return Objective(objective.counts, loss)


def run_online_dpo(cfg: OnlineDPOConfig, reward_fns: list | None = None, weights: list[float] | None = None,
                   backend=None) -> dict:
    """Train with online DPO. Python callers may pass their own reward callables (with ``weights``)
    and a rollout backend object (rollout/backend.py) in place of ``rollout.backend``'s."""
    functions, parsed = (reward_fns, None) if reward_fns is not None else parse_rewards(cfg.rewards)
    weights = weights if weights is not None else parsed or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ConfigError(f"{len(functions)} reward functions but {len(weights)} weights")
    refuse_offline_batch_fields("online_dpo", cfg.train)
    tc = cfg.train
    run = start_run(tc, cfg, "online_dpo", unit="rollout step", show=("reward_mean",))
    if cfg.prompts_per_step % run.info.world_size:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must divide over {run.info.world_size} ranks")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    rows, eval_rows = read_rows(cfg.train_data), held_out(cfg.eval_data, cfg.eval_limit, cfg.eval_task, run.say)
    needed = sorted({f for fn in functions for f in reward_fields(fn)})
    checks = {fn.row_check for fn in functions if hasattr(fn, "row_check")}
    report = check_prompts(rows, tokenizer, needed, RESERVED, checks)  # every row, before any model loads
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    policy = run.prepare(disable_dropout(load_causal_lm(cfg.model, tokenizer, device=run.device)), cfg.lora,
                         base=cfg.model, router_loss=True)
    check_positions(run, policy, report.longest, cfg.max_new_tokens)
    check_positions(run, policy, longest_prompt(eval_rows, tokenizer), cfg.eval_max_new_tokens)
    rewards = load_model_rewards(cfg, Rewards(list(functions), list(weights)), tokenizer, run.device)
    reference = frozen_reference(run, policy, cfg.model, tokenizer, cfg.lora.enabled)
    backend = backend or make_backend(cfg.rollout, tokenizer, policy, copy=run.shards_models, out_dir=tc.out_dir)
    run.shard(policy)
    evaluate = accuracy_eval(backend, policy, tokenizer, eval_rows, cfg.eval_max_new_tokens)
    before = run.start_eval(evaluate()) if evaluate else {}
    optimizer = build_optimizer(policy, tc.lr, tc.weight_decay)
    total = run.plan(len(rows), cfg.prompts_per_step)
    run.attach(policy, optimizer, build_scheduler(optimizer, total, tc.warmup_steps, tc.schedule, tc.min_lr_ratio))
    order = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed)
    objective = dpo_objective(DPOLoss(beta=cfg.beta, loss_type=cfg.loss_type, reference="forward"), reference,
                              run.router_coef)
    collate = ranking_collate(policy, tokenizer.pad_token_id, cfg.share_prompt)
    for step in run.steps(evaluate):
        sync = time.time()
        backend.load_weights(policy)  # a sharded policy: the gathered full weights into the backend's copy
        sync = time.time() - sync
        mine = [rows[i] for i in order.indices(step)[run.info.rank::run.info.world_size]]
        judged = judge(backend, tokenizer, mine, cfg, rewards,
                       SimpleNamespace(global_step=run.optimizer_steps, max_steps=total))  # TRL's names
        sums = reduce_dict(judged["sums"], run.info)
        means = {"time_generation_s": judged["time_generation_s"], "time_weight_sync_s": sync}
        shares = {}
        if sums["pairs"] > 0:
            shares, means["grad_norm"] = dpo_step(run, policy, judged["pairs"], objective, collate,
                                                  tc.micro_batch_size, tc.dtype)
        else:  # every pair of every rank tied (or unjudged): nothing to learn from, no optimizer step
            means["update_skipped"] = 1.0
        means.setdefault("update_skipped", 0.0)
        run.step_done(means={**judged_metrics(sums), **means}, shares=shares, evaluate=evaluate)
    summary = {"accuracy_before": before.get("accuracy"), "reward_mean": run.metrics.get("reward_mean")}
    if run.evals:
        summary["accuracy"] = run.evals[-1]["accuracy"]
    return run.finish(policy, tokenizer, summary)
