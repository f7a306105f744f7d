"""Rewards as plain Python callables, and the tiny default's outcome and process rewards.

Outcome reward: ``f(prompts, completions, **row_fields) -> list[float | None]``, one value per
completion (``None``: the function abstains for that sample). Several combine with weights.
Process reward: ``f(prompts, completions, completion_ids=..., tokenizer=..., **row_fields)
-> list[list[(step_end_token_index, step_reward)]]``.

A function that raises, returns the wrong number of values, or returns NaN stops the run with
a message naming the function and the sample, unless ``on_error="zero"``: then the sample
scores 0 for that function and the error is counted in the metrics.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.task import extract_answer, verify_steps


class RewardError(RuntimeError):
    pass


@dataclass
class OutcomeScores:
    rewards: torch.Tensor  # (B,) weighted sum over functions (abstentions add nothing)
    per_function: dict[str, torch.Tensor]  # name -> (B,) raw values, NaN where it abstained
    errors: dict[str, int] = field(default_factory=dict)


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def score_outcomes(functions: list[Callable], weights: list[float], prompts: list[str], completions: list[str],
                   row_fields: dict[str, list], on_error: str = "raise") -> OutcomeScores:
    total = torch.zeros(len(completions))
    per_function, errors = {}, {}
    for fn, weight in zip(functions, weights):
        name = _name(fn)
        try:
            values = list(fn(prompts, completions, **row_fields))
            if len(values) != len(completions):
                raise RewardError(f"reward function '{name}' returned {len(values)} values for "
                                  f"{len(completions)} completions")
        except Exception as e:
            if on_error != "zero":
                raise RewardError(f"reward function '{name}' failed on the batch starting with prompt "
                                  f"{prompts[0]!r}: {e}") from e
            values, errors[name] = [0.0] * len(completions), len(completions)
        column = torch.full((len(completions),), float("nan"))
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                if on_error != "zero":
                    raise RewardError(f"reward function '{name}' returned {v!r} for sample {i} "
                                      f"(prompt {prompts[i]!r}, completion {completions[i]!r})")
                errors[name] = errors.get(name, 0) + 1
                v = 0.0
            column[i] = float(v)
        per_function[name] = column
        total += weight * torch.nan_to_num(column, nan=0.0)
    return OutcomeScores(total, per_function, errors)


# --- the tiny default's rewards -------------------------------------------------------------

def exact_answer(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 when the completion's answer is exactly the row's ``answer``, else 0.0."""
    return [1.0 if extract_answer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]


def contains_answer(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 if the right answer appears as a whole number anywhere in the completion (BENCHMARK.md)."""
    return [1.0 if re.search(rf"(?<![\d-]){int(a)}(?!\d)", c) else 0.0 for c, a in zip(completions, answer)]


def char_to_token_index(tokenizer, ids: list[int], char_end: int) -> int:
    """Index of the token that holds character ``char_end - 1`` of ``decode(ids)``."""
    length = 0
    for k in range(len(ids)):
        length = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True))
        if length >= char_end:
            return k
    return max(len(ids) - 1, 0)


def arithmetic_steps(prompts, completions, completion_ids=None, tokenizer=None, **_) -> list[list[tuple[int, float]]]:
    """Process reward of the multi-step task: 1.0 per correct step, 0.0 per wrong one.

    A completion with no recognisable step gets one 0.0 step on its last token.
    """
    out = []
    for prompt, text, ids in zip(prompts, completions, completion_ids):
        steps = [(char_to_token_index(tokenizer, ids, s.char_end), 1.0 if s.correct else 0.0)
                 for s in verify_steps(prompt, text)]
        out.append(steps or [(max(len(ids) - 1, 0), 0.0)])
    return out


OUTCOME_REWARDS = {"exact_answer": exact_answer, "contains_answer": contains_answer}
PROCESS_REWARDS = {"arithmetic_steps": arithmetic_steps}
