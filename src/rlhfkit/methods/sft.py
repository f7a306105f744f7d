"""Supervised fine-tuning (InstructGPT stage 1): cross-entropy on the completion tokens (or every token).

Reads top to bottom: config -> data and held-out checks -> model -> objective -> the shared
loop -> save. Held-out evaluation reports the loss on the eval rows' completions and the
accuracy of greedy answers as the eval data's task checks them (tasks/).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..data.encode import (
    OVERLONG_POLICIES,
    LengthReport,
    collate_sft,
    collate_sft_packed,
    encode_sft,
    to_device,
)
from ..data.formats import row_format
from ..data.rows import DataError, read_rows, source_name
from ..losses.sft import SFT_LOSSES, sft_loss
from ..models.forward import eval_mode, reads_block_masks, router_balance, token_logprobs
from ..models.load import load_causal_lm, load_tokenizer
from ..rollout.backend import SamplerBackend
from ..rollout.evaluate import HeldOut, exact_match
from ..tasks import TASK_CHOICES
from ..train.config import ConfigError, LoraConfig, TrainConfig, all_used_only_with, at_least, choice, within
from ..train.loop import Objective, train_offline
from ..train.run import start_run
from .common import accuracy_eval, check_positions, head, longest, longest_prompt


@dataclass(frozen=True)
class SFTConfig:
    model: str = ""  # a causal-LM folder (Python API: or a model object, trained in place)
    tokenizer: str | None = None  # default: the model folder's (Python API: or a tokenizer object)
    train_data: str = ""  # jsonl / parquet: prompt + completion, or messages
    eval_data: str | None = None  # held-out rows: loss on their completions, accuracy of greedy answers
    eval_task: str = "auto"  # how greedy answers are checked: auto | arithmetic | reference (tasks/)
    max_length: int = 128
    overlong: str = "error"  # error | truncate | skip
    packing: bool = False  # padding-free: a micro-batch's sequences end to end in rows of max_length (SDPA only)
    # the loss on the completion (in messages, the assistant turns) alone; false: on every token, the prompt's
    # and the other turns' too (TRL's completion_only_loss=false, and its default for messages rows)
    completion_only_loss: bool | None = True
    loss_type: str = "nll"  # nll, or dft: Dynamic Fine-Tuning, each token's NLL times its probability (no gradient)
    eval_limit: int = 500  # held-out rows used; 0 = all
    eval_max_new_tokens: int = 16
    stop_at_accuracy: float | None = None  # end training once held-out accuracy reaches this
    snapshot_at_accuracy: float | None = None  # also save <out>/snapshot the first time it reaches this
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/sft"))

    def __post_init__(self):
        if self.completion_only_loss is None:  # TRL's default, which means two things there
            raise ConfigError("completion_only_loss=null is TRL's default, which trains the completion of prompt-"
                              "completion rows but every token of messages rows (its assistant_only_loss=false); "
                              "here set true (the completion, or the assistant turns) or false (every token)")
        choice("overlong", self.overlong, OVERLONG_POLICIES)
        choice("eval_task", self.eval_task, TASK_CHOICES)
        choice("loss_type", self.loss_type, SFT_LOSSES)
        at_least("max_length", self.max_length, 2)
        at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)
        at_least("eval_limit", self.eval_limit, 0)
        within("stop_at_accuracy", self.stop_at_accuracy, 0, 1)
        within("snapshot_at_accuracy", self.snapshot_at_accuracy, 0, 1)
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "stop_at_accuracy", "snapshot_at_accuracy",
                                  "eval_task", "train.eval_every"),
                           bool(self.eval_data), "held-out evaluation (eval_data)")


def sft_objective(router_coef: float = 0.0, form: str = "nll") -> Objective:
    """The NLL of the completion tokens (``form="dft"``: DFT's, losses/sft.py); ``router_coef`` > 0
    adds a mixture of experts' router balancing loss (models/forward.py ``router_balance``)."""
    def counts(batch) -> dict:
        return {"tokens": batch.completion_mask[:, 1:].sum().item(), "forwards": 1}

    def loss(model, batch, totals):
        with router_balance(model, router_coef) as balance:
            logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                                      position_ids=batch.position_ids)  # (B, T)
        value, metrics = sft_loss(logprobs, batch.completion_mask, totals["tokens"], form)
        metrics = {"tokens": metrics["tokens"]}
        return balance.add_to(value, metrics, 1 / totals["forwards"]), metrics

    return Objective(counts, loss)


def heldout_loss(model, examples: list, pad_id: int, batch_size: int = 64) -> float:
    """Mean negative log-likelihood per target token (the completion's, or with
    ``completion_only_loss=false`` every token but the first) over the held-out examples."""
    with eval_mode(model):
        nll = tokens = 0.0
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate_sft(examples[i: i + batch_size], pad_id), next(model.parameters()).device)
            logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
            nll -= float((logprobs * batch.completion_mask).sum())
            tokens += float(batch.completion_mask[:, 1:].sum())
    return nll / max(tokens, 1.0)


def policy_eval(model, tokenizer, rows: list, max_new_tokens: int, max_length: int,
                overlong: str = "error") -> tuple[dict, LengthReport | None]:
    """``rlhfkit eval`` of a policy: the exact match of its greedy answers where the rows are
    prompts, and the held-out loss (mean NLL per answer token) and its perplexity over the rows
    that hold answers or are ``text`` (TRL's eval_loss); a language-modeling eval has the loss alone."""
    text, answered = held_out_kinds(rows)
    metrics = {} if text else exact_match(model, tokenizer, rows, max_new_tokens)
    if not answered:
        return metrics, None
    examples, report = encode_sft(answered, tokenizer, max_length, overlong)
    loss = heldout_loss(model, examples, tokenizer.pad_token_id)
    scored = "every token of each text" if text else "the answer tokens (completion or assistant turns)"
    return {**metrics, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "loss_rows": len(examples),
            "loss_measured": f"mean negative log-likelihood per token over {scored}"}, report


def held_out_kinds(rows: list) -> tuple[bool, list]:
    """(whether the rows are language-modeling ``text`` rows, which have no prompt to answer, the
    rows the held-out loss is computed on: those with an answer, or text); text rows among prompts
    are a DataError."""
    text = [r for r in rows if "text" in r.data and row_format(r) == "language_modeling"]
    if text and len(text) < len(rows):
        raise DataError(f"{text[0].where}: a 'text' row among held-out prompts; held-out data holds either text rows "
                        "(the held-out loss alone) or prompts with their answers")
    return bool(text), [r for r in rows if "text" in r.data or "completion" in r.data or "messages" in r.data]


def held_out_sft(cfg: SFTConfig, tokenizer, say) -> tuple[HeldOut | None, list, LengthReport | None]:
    """The held-out prompts whose greedy answers give the accuracy (None for language-modeling
    ``text`` rows, which have no prompt: their loss alone), and the examples the held-out loss is
    computed on (every row with an answer), encoded under the training's length policy."""
    if not cfg.eval_data:
        return None, [], None
    rows = head(read_rows(cfg.eval_data), cfg.eval_limit, say, cfg.eval_data)
    text, with_answers = held_out_kinds(rows)
    if text and (cfg.stop_at_accuracy is not None or cfg.snapshot_at_accuracy is not None):
        raise ConfigError("eval_data holds 'text' rows, which have no prompt to answer: there is no accuracy "
                          "for stop_at_accuracy or snapshot_at_accuracy")
    prompts = None if text else HeldOut(rows, cfg.eval_task)
    if not with_answers:
        return prompts, [], None
    examples, report = encode_sft(with_answers, tokenizer, cfg.max_length, cfg.overlong, cfg.completion_only_loss)
    say(f"{source_name(cfg.eval_data)} (held out, for the loss): {report.summary()}")
    return prompts, examples, report


def run_sft(cfg: SFTConfig) -> dict:
    run = start_run(cfg.train, cfg, "sft")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    examples, report = encode_sft(read_rows(cfg.train_data), tokenizer, cfg.max_length, cfg.overlong,
                                  cfg.completion_only_loss)
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    rows, eval_examples, eval_report = held_out_sft(cfg, tokenizer, run.say)  # checked now, not after training
    model = run.prepare(load_causal_lm(cfg.model, tokenizer, device=run.device), cfg.lora, base=cfg.model,
                        router_loss=True)
    check_positions(run, model, longest(report, eval_report))
    check_positions(run, model, longest_prompt(rows, tokenizer), cfg.eval_max_new_tokens)
    backend = SamplerBackend(tokenizer, model, copy=run.shards_models)  # a copy is made before sharding
    run.shard(model)
    marker = Path(cfg.train.out_dir) / "snapshot" / "snapshot.json"
    snapshot: dict = json.loads(marker.read_text()) if run.resuming and marker.is_file() else {}

    def on_accuracy(accuracy: float) -> None:
        # InstructGPT's later stages start from a model with error left to remove: keep the
        # first model that reaches a modest accuracy (kept on resume: it is never overwritten).
        if cfg.snapshot_at_accuracy is None or snapshot or accuracy < cfg.snapshot_at_accuracy:
            return
        snapshot.update(path=str(marker.parent), accuracy=accuracy)
        metrics = {"step": run.done, **{f"train/{k}": v for k, v in run.metrics.items()}, "eval/accuracy": accuracy}
        run.save_model(model, tokenizer, marker.parent, metrics=metrics,  # this eval's, not the last one logged
                       files={marker.name: json.dumps(snapshot)})

    accuracy = accuracy_eval(backend, model, tokenizer, rows, cfg.eval_max_new_tokens,
                             cfg.stop_at_accuracy, on_accuracy)

    def evaluate(model) -> dict:
        loss = {"loss": heldout_loss(model, eval_examples, tokenizer.pad_token_id)} if eval_examples else {}
        return {**loss, **(accuracy() if accuracy else {})}

    if cfg.packing and not reads_block_masks(model):
        raise ConfigError("packing=true needs SDPA attention and no sliding window (its block-diagonal mask replaces "
                          f"the model's own); this model has attention "
                          f"{getattr(model.config, '_attn_implementation', None)!r}, sliding_window "
                          f"{getattr(model.config, 'sliding_window', None)!r}: set packing=false")
    collate = ((lambda b: collate_sft_packed(b, tokenizer.pad_token_id, cfg.max_length)) if cfg.packing else
               (lambda b: collate_sft(b, tokenizer.pad_token_id)))
    train_offline(run, model, examples, collate, sft_objective(run.router_coef, cfg.loss_type),
                  evaluate if rows or eval_examples else None,
                  what="examples (a conversation trained turn by turn gives one a turn)" if report.by_turn else "rows")
    summary = {"loss": run.metrics.get("loss"), "length_report": report.summary(), "snapshot": snapshot or None}
    if run.evals:
        summary.update(accuracy=run.evals[-1].get("accuracy"), eval_loss=run.evals[-1].get("loss"))
    return run.finish(model, tokenizer, summary)
