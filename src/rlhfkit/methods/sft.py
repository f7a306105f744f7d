"""Supervised fine-tuning (InstructGPT stage 1): cross-entropy on completion tokens only.

Reads top to bottom: config -> load model and data -> objective -> the shared loop -> save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.encode import collate_sft, encode_sft
from ..data.rows import read_rows
from ..losses.sft import sft_loss
from ..models.forward import token_logprobs
from ..models.load import save_model
from ..train.config import TrainConfig, to_dict
from ..train.loop import Objective, train_offline
from .common import accuracy_eval, finish, load_policy, say


@dataclass(frozen=True)
class SFTConfig:
    model: str = ""  # a causal-LM folder
    tokenizer: str | None = None  # default: the model folder's
    train_data: str = ""  # jsonl / parquet: prompt + completion, or messages
    eval_data: str | None = None  # held-out rows with an answer, for exact-match accuracy
    max_length: int = 128
    overlong: str = "error"  # error | truncate | skip
    eval_limit: int = 500
    eval_max_new_tokens: int = 16
    stop_at_accuracy: float | None = None  # end training once held-out accuracy reaches this
    snapshot_at_accuracy: float | None = None  # also save <out>/snapshot the first time it reaches this
    train: TrainConfig = field(default_factory=TrainConfig)


def sft_objective() -> Objective:
    def counts(batch) -> dict:
        return {"tokens": batch.completion_mask[:, 1:].sum().item()}

    def loss(model, batch, totals):
        logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)  # (B, T)
        value, metrics = sft_loss(logprobs, batch.completion_mask, totals["tokens"])
        return value, {"tokens": metrics["tokens"]}

    return Objective(counts, loss)


def run_sft(cfg: SFTConfig) -> dict:
    model, tokenizer = load_policy(cfg.model, cfg.tokenizer)
    examples, report = encode_sft(read_rows(cfg.train_data), tokenizer, cfg.max_length, cfg.overlong)
    say(f"sft: {cfg.train_data}: {report.summary()}")
    snapshot = {}

    def on_accuracy(model, accuracy: float) -> None:
        # InstructGPT's later stages start from a model with error left to remove: keep the
        # first checkpoint that reaches a modest accuracy.
        if cfg.snapshot_at_accuracy is not None and not snapshot and accuracy >= cfg.snapshot_at_accuracy:
            path = Path(cfg.train.out_dir) / "snapshot"
            save_model(model, tokenizer, path)
            snapshot.update(path=str(path), accuracy=accuracy)
            (path / "snapshot.json").write_text(json.dumps(snapshot))

    eval_fn = accuracy_eval(tokenizer, cfg.eval_data, cfg.eval_limit, cfg.eval_max_new_tokens,
                            cfg.stop_at_accuracy, on_accuracy)
    collate = lambda rows: collate_sft(rows, tokenizer.pad_token_id)  # noqa: E731
    result = train_offline(model, examples, collate, sft_objective(), cfg.train, to_dict(cfg), eval_fn)
    summary = {"steps": result.steps, "loss": result.metrics.get("loss"), "length_report": report.summary(),
               "evals": result.evals, "snapshot": snapshot or None}
    if result.evals:
        summary["accuracy"] = result.evals[-1]["accuracy"]
    return finish(model, tokenizer, cfg, cfg.train.out_dir, summary)
