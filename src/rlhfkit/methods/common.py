"""Small helpers the method files share: loading the policy, writing results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from ..data.rows import read_rows
from ..models.load import load_causal_lm, load_tokenizer, save_model
from ..rollout.evaluate import exact_match
from ..train.config import to_dict
from ..train.dist import init_distributed


def load_policy(model_path: str, tokenizer_path: str | None):
    tokenizer = load_tokenizer(model_path, tokenizer_path)
    return load_causal_lm(model_path, tokenizer), tokenizer


def accuracy_eval(tokenizer, eval_data: str | None, limit: int, max_new_tokens: int, stop_at: float | None = None,
                  on_accuracy=None):
    """An ``eval_fn`` for the loop: exact-match accuracy on the first ``limit`` held-out rows."""
    if not eval_data:
        return None
    rows = read_rows(eval_data)[:limit] if limit > 0 else read_rows(eval_data)

    def evaluate(model) -> dict:
        result = exact_match(model, tokenizer, rows, max_new_tokens)
        if on_accuracy is not None:
            on_accuracy(model, result["accuracy"])
        if stop_at is not None and result["accuracy"] >= stop_at:
            result["stop"] = True
        return result

    return evaluate


def finish(model, tokenizer, config, out_dir: str, summary: dict) -> dict:
    """Save the trained model to ``<out>/model`` and the summary to ``<out>/result.json`` (rank 0)."""
    if init_distributed().is_main:
        out = Path(out_dir)
        save_model(model, tokenizer, out / "model")
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        (out / "result.json").write_text(json.dumps(summary, indent=1))
    return summary


def say(message: str) -> None:
    if init_distributed().is_main:
        print(message, file=sys.stderr)
