"""Small helpers the method files share: loading the policy, held-out evaluation, checks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.encode import encode_row_prompt
from ..data.prefs import collate_rankings, collate_shared_prompt
from ..data.rows import DataError, read_rows, source_name
from ..models.forward import reads_block_masks
from ..models.load import load_causal_lm, load_tokenizer, position_limit
from ..models.lora import Reference
from ..rollout.backend import end_ids
from ..rollout.evaluate import HeldOut
from ..rollout.sampler import Samples, completion_logprobs
from ..train.config import ConfigError, TrainConfig
from ..train.loop import autocast, reduce_dict
from ..train.shard import mix_toward


def check_positions(run, model, longest: tuple[int, str], new_tokens: int = 0) -> None:
    """The longest sequence a run forwards (``longest``: tokens and the row's place, from the data's
    ``LengthReport``; ``new_tokens`` sampled after a prompt) against the model's positions: a
    DataError, before any training, where they are a learned table it would run past (an index
    error inside the model, mid-run); a warning where they are rotary and would be extrapolated."""
    limit = position_limit(model)
    tokens, where = longest
    if limit is None or not where or tokens + new_tokens <= limit[0]:  # no where: no rows (no eval set)
        return
    n, field, learned = limit
    what = f"{tokens} tokens" + (f" + {new_tokens} sampled" if new_tokens else "")
    cure = "shorten the prompt or lower max_new_tokens" if new_tokens else \
        "lower max_length (over-long rows: overlong=truncate or overlong=skip)"
    if learned:
        raise DataError(f"{where}: {what}, past the model's {n} positions ({field} in its config.json: a learned "
                        f"position table with no row beyond it); {cure}")
    run.say(f"warning: {where}: {what}, past the model's {n} positions ({field}); its positions are extrapolated "
            f"beyond them, which it was not trained on ({cure} to stay within them)")


def longest(*reports) -> tuple[int, str]:
    """The longest sequence over several ``LengthReport``s (None: a data set not given)."""
    return max((r.longest for r in reports if r is not None), default=(0, ""))


def longest_prompt(held: HeldOut | None, tokenizer) -> tuple[int, str]:
    """The longest prompt of held-out prompt rows (tokens, its row's place); (0, "") for none."""
    rows = held.rows if held is not None else []
    return max(((len(encode_row_prompt(tokenizer, r)), r.where) for r in rows), default=(0, ""))


def load_policy(model_path: str, tokenizer_path: str | None):
    tokenizer = load_tokenizer(model_path, tokenizer_path)
    return load_causal_lm(model_path, tokenizer), tokenizer


def frozen_reference(run, policy, source, tokenizer, from_adapters: bool, dtype: str = "fp32") -> Reference:
    """The frozen start model the KL or DPO terms compare with. With LoRA (``from_adapters``)
    it is the policy with its adapters switched off, the start model without a second copy;
    otherwise a frozen copy of ``source`` loaded now, sharded like the policy."""
    if from_adapters:
        return Reference(adapted=policy)
    module = load_causal_lm(source, tokenizer, dtype, device=run.device, copy=True).eval().requires_grad_(False)
    return Reference(module=run.shard(module))


def reference_sync(cfg, reference: Reference | None, policy, run, per_step: int = 1):
    """TR-DPO's hook (``sync_ref_model``, DPO and GRPO): ``sync(done)`` after each optimizer step
    moves the reference toward the policy after every ``ref_model_sync_steps``-th (TRL's
    SyncRefModelCallback), and says so; at its first call it warns where the run's optimizer
    steps (``run.max_steps`` x ``per_step``) end before the first sync. None when it is off."""
    if not cfg.sync_ref_model:
        return None
    first = [True]

    def sync(done: int) -> None:
        total = run.max_steps * per_step
        if first[0] and cfg.ref_model_sync_steps > total:
            run.say(f"warning: sync_ref_model: ref_model_sync_steps={cfg.ref_model_sync_steps} is past this run's "
                    f"{total} optimizer steps, so the reference never moves (TRL's default is 512)")
        first[0] = False
        if done % cfg.ref_model_sync_steps == 0:
            mix_toward(reference.module, policy, cfg.ref_model_mixup_alpha)
            run.say(f"optimizer step {done}: the reference moved toward the policy (sync_ref_model, alpha "
                    f"{cfg.ref_model_mixup_alpha})")

    return sync


def head(rows: list, limit: int, say=None, source=None) -> list:
    """The first ``limit`` rows; ``limit=0`` means all of them (in every method). Rows left out
    are told through ``say``, with the file ``source``."""
    if 0 < limit < len(rows) and say is not None:
        say(f"{source_name(source) if source is not None else 'held-out data'}: the first {limit} of {len(rows)} "
            f"rows are used (eval_limit={limit}; eval_limit=0 uses all)")
    return rows[:limit] if limit > 0 else rows


def held_out(path, limit: int, task: str, say=None) -> HeldOut | None:
    """Held-out prompts and their checker, read and validated now (None without a path)."""
    return HeldOut(head(read_rows(path), limit, say, path), task) if path else None


def accuracy_eval(backend, policy, tokenizer, rows: HeldOut | None, max_new_tokens: int,
                  stop_at: float | None = None, on_accuracy=None):
    """An ``evaluate() -> dict`` for the run skeleton: the task's accuracy on ``policy``'s greedy answers."""
    if rows is None:
        return None

    def evaluate() -> dict:
        backend.load_weights(policy)
        result, _, shown = rows.accuracy(backend, tokenizer, max_new_tokens)
        if on_accuracy is not None:
            on_accuracy(result["accuracy"])
        if stop_at is not None and result["accuracy"] >= stop_at:
            result["stop"] = True
        return {**result, "samples": shown}

    return evaluate


# The keys an online method's config does not read (its ``UNREAD``): ``load_config`` refuses them
# wherever a file or an override sets them, its default value too
OFFLINE_BATCH = {"train.batch_size": "it counts rows of offline data; set prompts_per_step (and for PPO "
                                     "minibatch_size) instead"}


def say_foreign_ids(run, samples: Samples, tokenizer) -> None:
    """Said once a run, by the rank that saw it: sampled tokens whose ids are rows of the model's
    output layer the tokenizer has no token for (a head padded past the vocabulary, as Qwen's);
    they decode to nothing, so rewards read answers without them while the update trains them.
    Distillation refuses them; here they are counted and said, not dropped."""
    if "foreign ids" in run.said:
        return
    foreign = int(((samples.completion_ids >= len(tokenizer)) & samples.completion_mask.bool()).sum())
    if foreign:
        run.said.add("foreign ids")
        run.say(f"warning: {foreign} sampled tokens of this batch are ids >= {len(tokenizer)}, output rows the "
                "tokenizer has no token for: they decode to nothing, so rewards read the answers without them; "
                "said once a run", every_rank=True)


# A generation config's sampling settings and the value under which each does nothing
FOLDER_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                   "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


def say_generation_config(run, model, tokenizer, params, source, key: str = "generation config") -> None:
    """Said once, before the first rollout, where the policy's generation config (its folder's
    ``generation_config.json``) asks for sampling settings other than the run's (Qwen2.5-Instruct's
    temperature 0.7, top_p 0.8, repetition_penalty 1.05): rollouts sample with the run's own, as
    TRL's trainers do. Its end ids beside the tokenizer's EOS (Gemma's ``<end_of_turn>``), where
    rollouts stop too (rollout/backend.py ``end_ids``), are named in a note. ``key``: said once a
    run under it (distillation's teacher, which samples too, has its own)."""
    config = getattr(model, "generation_config", None)
    if config is None or key in run.said:
        return
    run.said.add(key)
    source = source if isinstance(source, (str, Path)) and str(source) else "the policy"
    asked = config.to_diff_dict()
    ours = {**FOLDER_SAMPLING, "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
    differ = {k: asked[k] for k in FOLDER_SAMPLING if asked.get(k) is not None
              and asked[k] != FOLDER_SAMPLING[k] and asked[k] != ours[k]}
    if differ:
        run.say(f"note: {source}'s generation config asks for {_settings(differ)}; rollouts sample with this run's "
                f"{_settings({k: ours[k] for k in differ})} (as TRL's trainers use their own settings)")
    extra = end_ids(tokenizer, model)[1:]
    if extra:
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in extra)
        run.say(f"note: answers end at the tokenizer's EOS {tokenizer.eos_token!r} and at {names}, the other end ids "
                f"of {source}'s generation config (as TRL's GRPO stops)")


def _settings(values: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def refuse_offline_batch_fields(method: str, train: TrainConfig) -> None:
    """GRPO, RLOO, PPO and distillation size their batches in prompts; ``train.batch_size`` would be
    silently unused (a config built in Python: set to its default it cannot be told apart)."""
    if train.batch_size != TrainConfig.batch_size:
        raise ConfigError(f"{method}: train.batch_size does not apply ({OFFLINE_BATCH['train.batch_size']})")


def ranking_collate(model, pad_id: int, share_prompt: bool = True):
    """rows -> a batch: the shared-prompt layout when asked for and the model's attention reads it."""
    if share_prompt and reads_block_masks(model):
        read_pad_id = model.config.get_text_config().pad_token_id  # where the score head is read, as transformers does
        return lambda rows: collate_shared_prompt(rows, pad_id, read_pad_id)
    return lambda rows: collate_rankings(rows, pad_id)


@torch.no_grad()
def chunked_logprobs(model, samples: Samples, chunks: list[torch.Tensor], group: int = 1,
                     temperature: float = 1.0, dtype: str = "fp32") -> torch.Tensor:
    """Completion log-probs (B, C) of ``model`` at the sampling ``temperature``, one forward per
    micro-batch (under ``dtype``'s autocast, as the trained forward); 0 in the rows no chunk holds."""
    model.eval()
    out = torch.zeros_like(samples.logprobs)
    for index in chunks:
        with autocast(dtype, str(out.device)):
            out[index] = completion_logprobs(model, samples.rows(index), group_size=group, temperature=temperature)
    return out


def trainer_logprobs(backend, params, dtype: str) -> bool:
    """Whether the backend's log-probs serve as pi_old: they are the policy's own (``logprobs_exact``)
    and the trained forward computes them as the sampler does, in fp32 (a bf16 autocast forward is
    up to a few 1e-2 apart: the first update's ratios would not be 1)."""
    return dtype == "fp32" and backend.logprobs_exact(params)


class RewardShift:
    """BCO's reward shift delta (losses/dpo.py ``bco_pair``, losses/kto.py ``bco``): the running
    mean of the implicit rewards beta log(pi / pi_ref) of every answer trained on in the steps
    before this one, over every rank (0 before the first step). The loss reads ``mean`` and
    ``add``s its answers' rewards; ``update`` after each optimizer step folds the step's in, over
    the ranks, and keeps the mean and count in the run's checkpoints, so a resumed run goes on
    with the straight run's delta. TRL's BCOTrainer counts the micro-batch at hand too
    (RunningMoments): here a step's delta is of the steps before it, the same at every
    micro-batch and rank."""

    def __init__(self, run):
        self.run = run
        self.mean, self.count = run.state.get("reward_shift", (0.0, 0))
        self.step_sum, self.step_count = 0.0, 0

    def add(self, rewards: torch.Tensor) -> None:
        self.step_sum = self.step_sum + rewards.detach().float().sum()
        self.step_count += rewards.numel()

    def update(self, done: int) -> None:
        step = reduce_dict({"sum": self.step_sum, "count": float(self.step_count)}, self.run.info)
        self.count += int(step["count"])
        if self.count:
            self.mean += (step["sum"] - self.mean * step["count"]) / self.count
        self.step_sum, self.step_count = 0.0, 0
        self.run.keep["reward_shift"] = (self.mean, self.count)
