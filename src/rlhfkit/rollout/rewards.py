"""Rewards as plain Python callables: scoring samples with a weighted set of them.

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
from dataclasses import dataclass, field
from typing import Callable

import torch


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


def load_callable(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function, or a RewardError
    that names the spec (raised when the config is read, before any model loads)."""
    import importlib
    import importlib.util
    from pathlib import Path

    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"rlhfkit_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, name)
    except Exception as e:  # the user's module may raise anything while importing
        raise RewardError(f"reward {spec!r} cannot be loaded: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    return fn
