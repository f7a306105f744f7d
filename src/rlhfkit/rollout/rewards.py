"""Rewards as plain Python callables: scoring samples with a weighted set of them.

Outcome reward: ``f(prompts, completions, **row_fields) -> list[float | None]``, one value per
completion (``None``: the function abstains for that sample). Several combine with weights.
Process reward: ``f(prompts, completions, completion_ids=..., tokenizer=..., **row_fields)
-> list[list[(step_end_token_index, step_reward)]]``.

A function whose parameters name ``completions``, or that takes fewer than two arguments by
position (``def f(**kwargs)``), is called as TRL calls its reward functions, every argument by
name, so TRL's ``def accuracy(completions, solution, **kwargs)`` works as it is; any other gets
prompts and completions first, by position (``def f(p, c, **kw)``, rlhfkit's earlier form).
Either way a function gets only the arguments it takes (all of them with ``**kwargs``): ``prompts``, ``completions``, ``completion_ids`` (each completion's token
ids, without padding and the end token), ``trainer_state`` (``global_step``, ``max_steps``), the row's
fields, and for a process reward ``tokenizer``. Where the prompts are chat messages the
completions are too, one assistant message each (``[{"role": "assistant", "content": ...}]``),
as in TRL; ``completion_text`` gives the text of either kind.

A function that raises, returns the wrong number of values, returns NaN or something that is
not a number (numpy and 0-d torch scalars are numbers), or does not return within
``timeout_s``, stops the run with a message naming the function and the sample, unless
``on_error="zero"``: then the sample scores 0 for that function, the error is counted, and the
first one's text is kept (``OutcomeScores.messages``), so that a run can say what went wrong.

The row fields a reward reads are found before any model loads (``reward_fields``): declared
with ``@reads("answer")`` (rlhfkit.data.rows), else the parameters without a default that are not
``RESERVED`` (after the first two, for a function called by position). No row field may be
named like a reward argument.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.formats import completion_text  # noqa: F401  (re-exported for reward authors)
from ..data.rows import reads  # noqa: F401  (re-exported: reward authors declare their fields with it)

RESERVED = ("prompts", "completions", "completion_ids", "tokenizer", "trainer_state")  # what rlhfkit passes itself


class RewardError(RuntimeError):
    pass


@dataclass
class OutcomeScores:
    rewards: torch.Tensor  # (B,) weighted sum over functions (abstentions add nothing)
    per_function: dict[str, torch.Tensor]  # name -> (B,) raw values, NaN where it abstained
    errors: dict[str, int] = field(default_factory=dict)
    errored: torch.Tensor | None = None  # (B,) True where a reward returned no number for that sample (zeroed)
    messages: dict[str, str] = field(default_factory=dict)  # name -> what went wrong first, where errors were zeroed


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def reward_names(functions: list[Callable]) -> list[str]:
    """Each function's name, a second of the same name (two lambdas, two files' ``score``) as
    NAME_2, and so on: its column, its metrics and GDPO's place for its weight are its own."""
    names, seen = [], {}
    for fn in functions:
        base = _name(fn)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _parameters(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or extension callable: no signature to read
        return None


def by_keyword(fn: Callable) -> bool:
    """Whether ``fn`` is called as TRL calls rewards, every argument by name: its parameters name
    ``completions``, or it takes fewer than two by position (``def f(**kwargs)``, ``def
    f(prompts, **kwargs)``). Otherwise (``def f(p, c, **kw)``) prompts and completions go first,
    by position."""
    params = _parameters(fn)
    if params is None:
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.POSITIONAL_ONLY for p in positional[:2]):
        return False
    return any(p.name == "completions" for p in params) or len(positional) < 2


def reward_fields(fn: Callable) -> tuple[str, ...]:
    """The row fields ``fn`` needs: ``@reads(...)``, else its named parameters without a default
    that rlhfkit does not pass itself (after the first two where it is called by position)."""
    declared = getattr(fn, "row_fields", None)
    if declared is not None:
        return tuple(declared)
    params = _parameters(fn)
    if params is None:
        return ()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not by_keyword(fn):
        named = named[2:]  # after prompts, completions
    return tuple(p.name for p in named if p.default is p.empty and p.name not in RESERVED)


def call_reward(fn: Callable, timeout_s: float, prompts: list, completions: list, **named):
    """``fn`` called with the arguments it takes: by name (``by_keyword``) or with prompts and
    completions by position; of ``named`` (the row fields, ``completion_ids``, ...) the ones its
    parameters name, or all of them where it takes ``**kwargs``."""
    params = _parameters(fn)
    keyword = by_keyword(fn)
    if keyword:
        named = {"prompts": prompts, "completions": completions, **named}
    if params is not None and not any(p.kind == p.VAR_KEYWORD for p in params):
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not keyword:
            names -= {p.name for p in params[:2]}  # the two given by position
        named = {k: v for k, v in named.items() if k in names}
    if keyword:
        return call_with_timeout(fn, timeout_s, **named)
    return call_with_timeout(fn, timeout_s, prompts, completions, **named)


def _raised(error: Exception) -> str:
    """What a reward raised: its type and message, and where (the innermost frame: the reward's
    own code, or the library it called), e.g. "KeyError: 'answer' (rewards.py:12 in flaky)"."""
    text = f"{type(error).__name__}: {error}" if not isinstance(error, RewardError) else str(error)
    theirs = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != __file__]  # not rlhfkit's call
    inner = theirs[-1] if theirs and not isinstance(error, (RewardError, TimeoutError)) else None
    return text + (f" ({inner.filename}:{inner.lineno} in {inner.name})" if inner is not None else "")


def _signature_hint(error: Exception) -> str:
    """Advice on the calling convention where the call itself failed on its arguments."""
    text = str(error)
    if isinstance(error, TypeError) and any(k in text for k in ("positional argument", "keyword argument")):
        return ("; a reward whose parameters name completions (or that takes none by position) gets every "
                "argument by name, as in TRL (prompts, completions, completion_ids, trainer_state and the row's "
                "fields), else prompts and completions first, by position")
    return ""


def as_completions(texts: list[str], prompts: list) -> list:
    """What rewards get as ``completions``: the texts, or for a chat prompt one assistant message each."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for t, p in zip(texts, prompts)]


def as_number(value) -> float | None:
    """A reward value as a float: Python, numpy and 0-d torch numbers, and booleans as 1.0 and 0.0
    (as TRL casts them); None when it is not one."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars and 0-d arrays, 0-d tensors
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) else None


_LOOP: dict = {}  # the one event loop async rewards run on, in a daemon thread of its own (``awaited``)


def awaited(value, timeout_s: float = 0.0):
    """``value``, or where it is a coroutine (an ``async def`` reward, as TRL takes them) its
    result, run on one event loop kept for the process in a thread of its own, as TRL keeps one:
    state a reward binds to its loop (a semaphore, an async HTTP client) lasts from call to call,
    and a caller's own running loop (a notebook's) is left alone. TimeoutError after ``timeout_s``
    seconds (0: no limit)."""
    if not inspect.iscoroutine(value):
        return value
    if "loop" not in _LOOP or not _LOOP["loop"].is_running():  # a loop a reward's KeyboardInterrupt ended: anew
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True, name="reward-async").start()
        _LOOP["loop"] = loop
    future = asyncio.run_coroutine_threadsafe(_caught(value), _LOOP["loop"])
    try:
        outcome, raised = future.result(timeout_s or None)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no result within reward_timeout_s={timeout_s:g} s") from None
    if raised:
        raise outcome
    return outcome


async def _caught(coroutine):
    """(result, False), or (the exception, True) for any a reward raises: a KeyboardInterrupt or
    SystemExit raised inside the loop would end the loop's thread and leave its caller waiting for
    ever; handed back, it is raised in the caller's thread."""
    try:
        return await coroutine, False
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
        if isinstance(e, asyncio.CancelledError):
            raise
        return e, True


def call_with_timeout(fn: Callable, timeout_s: float, *args, **kwargs):
    """``fn(*args, **kwargs)`` (awaited where it is ``async``), or TimeoutError after ``timeout_s``
    seconds (0: no limit). A call that hangs is left in a daemon thread: Python cannot stop it, but
    the run no longer waits."""
    if not timeout_s or inspect.iscoroutinefunction(fn):  # a coroutine's limit is kept by its loop
        return awaited(fn(*args, **kwargs), timeout_s)
    box: dict = {}

    def target():
        try:
            box["value"] = awaited(fn(*args, **kwargs))
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


def score_outcomes(functions: list[Callable], weights: list[float], prompts: list, completions: list,
                   row_fields: dict[str, list], on_error: str = "raise", timeout_s: float = 0.0,
                   **passed) -> OutcomeScores:
    """Every function on the batch (``call_reward``; ``passed``: ``completion_ids``, ``trainer_state``)."""
    total = torch.zeros(len(completions))
    per_function, errors, messages = {}, {}, {}
    errored = torch.zeros(len(completions), dtype=torch.bool)
    for fn, weight, name in zip(functions, weights, reward_names(functions)):
        try:
            values = call_reward(fn, timeout_s, prompts, completions, **passed, **row_fields)
            if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
                raise RewardError(f"returned {type(values).__name__}, not a list of one number (or None) per "
                                  "completion")
            values = list(values)
            if len(values) != len(completions):
                raise RewardError(f"reward function '{name}' returned {len(values)} values for "
                                  f"{len(completions)} completions")
        except Exception as e:
            failed = (f"reward function '{name}' failed on the batch starting with prompt {prompts[0]!r}: "
                      f"{_raised(e)}{_signature_hint(e)}")
            if on_error != "zero":
                raise RewardError(failed) from e
            values, errors[name] = [0.0] * len(completions), len(completions)
            errored[:] = True
            messages[name] = failed
        column = torch.full((len(completions),), float("nan"))
        for i, value in enumerate(values):
            if value is None:
                continue
            v = as_number(value)
            if v is None or math.isnan(v) or math.isinf(v):
                wrong = (f"reward function '{name}' returned {value!r} for sample {i} "
                         f"(prompt {prompts[i]!r}, completion {completions[i]!r})"
                         + ("; to abstain on a sample return None (TRL also reads NaN so; rlhfkit takes it for an "
                            "error)" if v is not None and math.isnan(v) else ""))
                if on_error != "zero":
                    raise RewardError(wrong)
                messages.setdefault(name, wrong)
                errors[name] = errors.get(name, 0) + 1
                errored[i] = True
                v = 0.0
            column[i] = float(v)
        per_function[name] = column
        total += weight * torch.nan_to_num(column, nan=0.0)
    if per_function:  # a sample every function abstained on has no reward (NaN): group_advantages leaves it out
        total[torch.stack(list(per_function.values())).isnan().all(0)] = float("nan")
    return OutcomeScores(total, per_function, errors, errored, messages)


def load_callable(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function, or a RewardError
    that names the spec and, for an error the user's code raised while importing, its file and
    line (raised when the config is read, before any model loads). A module is found where Python
    finds it, then in the working directory (as ``python -m`` would find it: the ``rlhfkit``
    command's own path does not hold it); a file's own folder is searched too, so that it imports
    the modules beside it, as ``python path/to/file.py`` would."""
    import importlib
    import importlib.util
    import os
    import sys
    from pathlib import Path

    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.append(folder)  # after the installed packages: they keep their precedence
            module_spec = importlib.util.spec_from_file_location(f"rlhfkit_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())  # after the installed packages: they keep their precedence
            module = importlib.import_module(target)
        fn = getattr(module, name)
    except Exception as e:  # the user's module may raise anything while importing
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__) if "importlib" not in f.filename
                  and not f.filename.startswith("<") and Path(f.filename).resolve() != Path(__file__).resolve()]
        at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        raise RewardError(f"reward {spec!r} cannot be loaded: {type(e).__name__}: {e}{at}") from None
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    return fn
