"""Rewards as plain Python callables: scoring samples with a weighted set of them.

Outcome reward: ``f(prompts, completions, **row_fields) -> list[float | None]``, one value per
completion (``None``: the function abstains for that sample). Several combine with weights.
Process reward: ``f(prompts, completions, completion_ids=..., tokenizer=..., **row_fields)
-> list[list[(step_end_token_index, step_reward)]]``.

A function that raises, returns the wrong number of values, returns NaN or something that is
not a number (numpy and 0-d torch scalars are numbers), or does not return within
``timeout_s``, stops the run with a message naming the function and the sample, unless
``on_error="zero"``: then the sample scores 0 for that function and the error is counted.

The row fields a reward reads are found before any model loads (``reward_fields``): declared
with ``@reads("answer")`` (rlhfkit.data.rows), else the keyword parameters without a default.
No row field may be named like a reward argument (``RESERVED``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.rows import reads  # noqa: F401  (re-exported: reward authors declare their fields with it)

RESERVED = ("prompts", "completions", "completion_ids", "tokenizer")  # the arguments rlhfkit passes itself


class RewardError(RuntimeError):
    pass


@dataclass
class OutcomeScores:
    rewards: torch.Tensor  # (B,) weighted sum over functions (abstentions add nothing)
    per_function: dict[str, torch.Tensor]  # name -> (B,) raw values, NaN where it abstained
    errors: dict[str, int] = field(default_factory=dict)


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def reward_fields(fn: Callable) -> tuple[str, ...]:
    """The row fields ``fn`` needs: ``@reads(...)``, else its keyword parameters without a default."""
    declared = getattr(fn, "row_fields", None)
    if declared is not None:
        return tuple(declared)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][2:]  # after prompts, completions
    return tuple(p.name for p in named if p.default is p.empty and p.name not in RESERVED)


def as_number(value) -> float | None:
    """A reward value as a float: Python, numpy and 0-d torch numbers; None when it is not one."""
    if isinstance(value, bool):
        return None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars and 0-d arrays, 0-d tensors
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def call_with_timeout(fn: Callable, timeout_s: float, *args, **kwargs):
    """``fn(*args, **kwargs)``, or TimeoutError after ``timeout_s`` seconds (0: no limit). A call
    that hangs is left in a daemon thread: Python cannot stop it, but the run no longer waits."""
    if not timeout_s:
        return fn(*args, **kwargs)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"reward-{_name(fn)}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no result within reward_timeout_s={timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def score_outcomes(functions: list[Callable], weights: list[float], prompts: list[str], completions: list[str],
                   row_fields: dict[str, list], on_error: str = "raise", timeout_s: float = 0.0) -> OutcomeScores:
    total = torch.zeros(len(completions))
    per_function, errors = {}, {}
    for fn, weight in zip(functions, weights):
        name = _name(fn)
        try:
            values = list(call_with_timeout(fn, timeout_s, prompts, completions, **row_fields))
            if len(values) != len(completions):
                raise RewardError(f"reward function '{name}' returned {len(values)} values for "
                                  f"{len(completions)} completions")
        except Exception as e:
            if on_error != "zero":
                raise RewardError(f"reward function '{name}' failed on the batch starting with prompt "
                                  f"{prompts[0]!r}: {e}") from e
            values, errors[name] = [0.0] * len(completions), len(completions)
        column = torch.full((len(completions),), float("nan"))
        for i, value in enumerate(values):
            if value is None:
                continue
            v = as_number(value)
            if v is None or math.isnan(v) or math.isinf(v):
                if on_error != "zero":
                    raise RewardError(f"reward function '{name}' returned {value!r} for sample {i} "
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
