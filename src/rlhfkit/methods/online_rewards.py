"""The online methods' rewards as their configs name them (``RewardKeys``): shipped rule rewards,
reward-model folders (``rm:PATH``), Python callables (``module:function``, ``file.py:function``),
their weights, and GRPO's process reward (a shipped rule or ``prm:PATH``); resolved once,
recorded as the run used them, their prompt rows read and checked, and scored on a batch of
samples (``score_samples``). methods/grpo.py (and RLOO) and methods/online_dpo.py call these.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.encode import LengthReport, check_prompts
from ..data.formats import user_prompt
from ..data.rows import read_rows, source_name
from ..models.reward import is_sequence_classifier
from ..rollout.evaluate import HeldOut
from ..rollout.reward_models import ProcessRewardModelReward, RewardModelReward, check_renders
from ..rollout.rewards import (
    RESERVED,
    OutcomeScores,
    as_completions,
    load_callable,
    reward_fields,
    score_outcomes,
)
from ..rollout.sampler import Samples, decode, ids_before_end
from ..tasks import OUTCOME_REWARDS, PROCESS_REWARDS
from ..train.config import ConfigError, choice, plain_dict
from ..train.dist import all_gather_object
from .common import check_positions, held_out


def model_folder(key: str, path: str, is_kind, kind: str) -> str:
    """A learned reward's folder, checked when the config is read (before any model loads)."""
    if not Path(path).is_dir():
        raise ConfigError(f"config key '{key}': folder not found: {path}")
    if not is_kind(path):
        raise ConfigError(f"config key '{key}': {path!r} is not a ...{kind} model folder")
    return path


@dataclass(frozen=True)
class ModelReward:
    """``rm:PATH`` in ``rewards``: a reward model, loaded once the policy's tokenizer and device are known."""

    path: str
    name: str


def parse_rewards(spec: str) -> tuple[list, list[float]]:
    """``name[:weight],...``: a shipped reward (tasks/), ``rm:PATH[:weight]`` (a sequence-classifier
    folder), ``package.module:function[:weight]`` or ``path/file.py:function[:weight]`` (signature
    in rollout/rewards.py)."""
    refuse_recorded_callable("rewards", spec)
    functions, weights = [], []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if parts[0] == "rm" and len(parts) > 1:
            names = sum(isinstance(f, ModelReward) for f in functions)
            fn = ModelReward(model_folder("rewards", parts[1], is_sequence_classifier, "ForSequenceClassification"),
                             f"rm_{names + 1}" if names else "rm")
            weight = parts[2:]
        elif parts[0] in OUTCOME_REWARDS or len(parts) == 1:
            choice("rewards", parts[0], tuple(OUTCOME_REWARDS))
            fn, weight = OUTCOME_REWARDS[parts[0]], parts[1:]
        else:
            fn, weight = load_callable(":".join(parts[:2])), parts[2:]
        try:
            weights.append(float(weight[0]) if weight else 1.0)
            if len(weight) > 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"config key 'rewards': {item!r} must be name[:weight], module:function[:weight] "
                              "or file.py:function[:weight] with a numeric weight") from None
        functions.append(fn)
    return functions, weights


@dataclass(frozen=True)
class RewardKeys:
    """What a method's config says of its rewards: ``rewards`` (and the config class's default,
    to say where Python callables replace a set value), GRPO's ``process_reward`` and
    ``overlong_buffer`` (online DPO has neither), and ``train.micro_batch_size`` (rows a learned
    reward scores a forward)."""

    rewards: str
    default: str
    process_reward: str | None = None
    overlong_buffer: int = 0
    micro_batch_size: int = 0


@dataclass(frozen=True)
class Rewards:
    functions: list
    weights: list[float]
    process: object = None  # a process reward callable: PRM advantages instead of ORM


def resolve_rewards(keys: RewardKeys, functions=None, weights=None, process=None) -> Rewards:
    functions, parsed = (functions, None) if functions is not None else parse_rewards(keys.rewards)
    weights = weights if weights is not None else parsed or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ConfigError(f"{len(functions)} reward functions but {len(weights)} weights")
    spec = keys.process_reward
    if process is None and spec and not spec.startswith("prm:"):
        process = PROCESS_REWARDS[spec]
    named = [getattr(f, "name", None) or getattr(f, "__name__", type(f).__name__) for f in functions]
    if keys.overlong_buffer and "overlong" in named:
        raise ConfigError("a reward named 'overlong' would be logged under the name of overlong_buffer's "
                          "penalty (reward/overlong_mean); rename it")
    if (process or spec) and "process" in named:
        raise ConfigError("a reward named 'process' would be logged under the name of the process reward's "
                          "step rewards (reward/process_mean); rename it")
    return Rewards(list(functions), list(weights), process)


# how config.yaml records a reward passed from Python that no module:function finds
NOT_RERUNNABLE = "a Python callable passed to {caller}: not importable, so not re-runnable from the CLI"


def importable_spec(fn) -> str | None:
    """``module:function``, as ``rewards`` takes it, where ``fn`` is a module's top-level function
    that the module holds under its name; None for a lambda, a nested function, a callable object,
    or one defined in the script that runs (``__main__``: loading it would run the script)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or not qualname.isidentifier():  # "<lambda>", "f.<locals>.g", "A.f"
        return None
    return f"{module}:{qualname}" if getattr(sys.modules.get(module), qualname, None) is fn else None


def recorded_config(cfg, rewards: Rewards, functions_passed: bool, process_passed: bool = False,
                    caller: str = "run_grpo") -> dict:
    """The config as config.yaml, the checkpoints and the model card record it: the rewards passed
    from Python in place of the config's own, which they replace (``replaced_rewards``), each as
    ``module:function:weight`` where that finds it (``importable_spec``: the CLI can run the
    recorded config again), else by name, marked as not re-runnable (``refuse_recorded_callable``)."""
    def name(fn) -> str:
        return getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)

    def spec(fn, weight: float) -> str:
        found = importable_spec(fn)
        weight = repr(float(weight))  # every digit: the config runs again with the same weights (numpy's too)
        return f"{found}:{weight}" if found else f"{name(fn)}:{weight} ({NOT_RERUNNABLE.format(caller=caller)})"

    config = plain_dict(cfg)
    if functions_passed:
        config["rewards"] = ",".join(spec(f, w) for f, w in zip(rewards.functions, rewards.weights))
    if process_passed:
        config["process_reward"] = f"{name(rewards.process)} ({NOT_RERUNNABLE.format(caller='run_grpo')})"
    return config


def refuse_recorded_callable(key: str, value: str) -> None:
    """A config.yaml value naming a reward passed from Python that no module:function finds: said
    as such, not as an unknown reward or a module that cannot be imported."""
    # the marker, and the one of configs recorded before rewards were recorded by module:function
    if "not re-runnable from the CLI" in value or "(Python callables passed to " in value:
        raise ConfigError(f"config key '{key}': {value!r} was recorded by a run whose reward was a Python callable "
                          "that cannot be imported (a lambda, a nested function, or one defined in the script that "
                          "ran); move it to a module and give it as module:function[:weight] or "
                          "path/file.py:function[:weight]", keys=[key])


def replaced_rewards(keys: RewardKeys, functions_passed: bool, process_passed: bool = False,
                     caller: str = "run_grpo") -> list[str]:
    """What the config set that the rewards passed from Python replace, to be said."""
    said = []
    if functions_passed and keys.rewards != keys.default:
        said.append(f"rewards={keys.rewards!r} in the config is replaced by the reward functions passed to {caller}")
    if process_passed and keys.process_reward is not None:
        said.append(f"process_reward={keys.process_reward!r} in the config is replaced by the process reward passed "
                    "to run_grpo")
    return said


def load_model_rewards(keys: RewardKeys, rewards: Rewards, tokenizer, device: str) -> Rewards:
    """The learned rewards' models loaded (frozen, on the policy's device); rule functions unchanged."""
    chunk = keys.micro_batch_size  # rows per forward (0: the whole batch in one)
    functions = [RewardModelReward(f.path, tokenizer, device, f.name, chunk) if isinstance(f, ModelReward) else f
                 for f in rewards.functions]
    process = rewards.process
    spec = keys.process_reward
    if process is None and spec and spec.startswith("prm:"):
        process = ProcessRewardModelReward(spec[4:], tokenizer, device, chunk)
    return Rewards(functions, rewards.weights, process)


def prompt_rows(run, cfg, tokenizer, functions: list) -> tuple[list, HeldOut | None, LengthReport]:
    """``cfg.train_data``'s prompt rows, every one checked before any model loads for the fields
    ``functions`` read (and the values their ``@reads(..., check=)`` checks), said with their
    lengths; and ``cfg.eval_data``'s held-out prompts. Returns (rows, held-out, length report)."""
    rows, eval_rows = read_rows(cfg.train_data), held_out(cfg.eval_data, cfg.eval_limit, cfg.eval_task, run.say)
    needed = sorted({f for fn in functions for f in reward_fields(fn)})
    checks = {fn.row_check for fn in functions if hasattr(fn, "row_check")}
    report = check_prompts(rows, tokenizer, needed, RESERVED, checks)
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    return rows, eval_rows, report


def check_learned_rewards(run, rewards: Rewards, rows: list, longest: tuple[int, str], new_tokens: int) -> dict:
    """Every learned reward's model checked against the longest prompt with ``new_tokens`` (its
    positions) and its tokenizer against the prompts (``check_renders``), and a reward model with
    another tokenizer said; returns the metrics that record the latter (``reward/NAME_retokenised``)."""
    for learned in [f for f in [*rewards.functions, rewards.process] if hasattr(f, "model")]:
        check_renders(learned, rows)
        check_positions(run, learned.model, longest, new_tokens)
    models = [f for f in rewards.functions if isinstance(f, RewardModelReward)]
    for f in filter(lambda f: f.retokenise, models):
        run.say(f"reward {f.__name__}: its tokenizer differs from the policy's; prompts and completions are re-tokenised")
    return {f"reward/{f.__name__}_retokenised": float(f.retokenise) for f in models}


def bind(fn, samples: Samples, rows: list):
    """A learned reward (rollout/reward_models.py) bound to this step's samples; a function as it is."""
    return fn.bind(samples, rows) if hasattr(fn, "bind") else fn


@dataclass(frozen=True)
class Scored:
    """A batch of samples as the rewards read them, and their outcome scores."""

    outcome: OutcomeScores
    prompts: list  # one per sample: text, or chat messages
    completions: list  # text, or one assistant message each
    fields: dict  # the rows' other fields, one value per sample
    passed: dict  # completion_ids, trainer_state
    rows: list  # the row of each sample


def score_samples(tokenizer, samples: Samples, rows: list, group: int, rewards: Rewards, on_error: str,
                  timeout_s: float, trainer_state) -> Scored:
    """Every outcome reward on ``samples``, ``group`` consecutive samples per row of ``rows``
    (learned rewards bound to them), with what TRL passes a reward function: the prompts, the
    completions, the rows' other fields, ``completion_ids`` (without EOS) and ``trainer_state``."""
    prompts = [user_prompt(r) for r in rows for _ in range(group)]
    completions = as_completions(decode(tokenizer, samples), prompts)
    keys = sorted({k for r in rows for k in r.data} - {"prompt", "messages"})
    fields = {k: [r.data.get(k) for r in rows for _ in range(group)] for k in keys}
    ids = ids_before_end(tokenizer, samples)
    passed = {"completion_ids": ids, "trainer_state": trainer_state}
    per_sample = [r for r in rows for _ in range(group)]
    functions = [bind(f, samples, per_sample) for f in rewards.functions]
    outcome = score_outcomes(functions, rewards.weights, prompts, completions, fields, on_error, timeout_s, **passed)
    return Scored(outcome, prompts, completions, fields, passed, per_sample)


class RewardErrors:
    """Under ``reward_errors=zero``, what a run tells of its rewards' errors: each reward's first,
    its text said once by the rank it happened on (``first``), and at the end the run's totals over
    every rank, from each step's ``reward/NAME_errors`` (``count``), in a warning and the summary;
    the checkpoints keep the totals, so a resumed run ends with the straight run's."""

    def __init__(self, run):
        self.said, self.totals = set(), dict(run.state.get("reward_errors", {}))
        run.keep["reward_errors"] = self.totals

    def first(self, run, outcome: OutcomeScores) -> None:
        for name, text in outcome.messages.items():
            if name not in self.said:
                self.said.add(name)
                run.say(f"{text}: scored 0 (reward_errors=zero); later errors of '{name}' are counted in "
                        f"reward/{name}_errors, not said", every_rank=True)

    def count(self, metrics: dict) -> None:  # a step's means (summed over ranks), before its step_done saves
        for key, value in metrics.items():
            if key.startswith("reward/") and key.endswith("_errors"):
                name = key[len("reward/"):-len("_errors")]
                self.totals[name] = self.totals.get(name, 0) + int(value)

    def summary(self, run) -> dict:
        """The run's totals (``reward_errors`` in result.json), said as a warning, where any is not 0
        (under ``reward_errors=raise`` an error stops the run: they are all 0)."""
        failed = {name: n for name, n in self.totals.items() if n}
        if failed:
            run.say("warning: reward_errors=zero scored 0 where rewards failed: "
                    + ", ".join(f"'{name}' on {n} answers" for name, n in failed.items())
                    + " over the run (reward/NAME_errors per step)")
        return {"reward_errors": self.totals} if failed else {}


def reward_stats(scores: torch.Tensor, per_function: dict, errors: dict, info, more: dict | None = None):
    """The step's reward statistics over every rank's samples, gathered whole (an average of the
    ranks' standard deviations is none): ``reward_mean`` / ``_std`` of the scores (NaN ones, where
    every reward abstained, left out), and each reward's ``reward/NAME_mean``, ``_std`` (where it
    did not abstain) and ``_errors`` (summed over ranks). ``more``: other (B,) columns to gather.
    Returns (the statistics, ``more``'s columns whole)."""
    mine = {"scores": scores, **{f"fn/{k}": v for k, v in per_function.items()},
            **{f"more/{k}": v for k, v in (more or {}).items()}}
    everyone = all_gather_object({k: torch.as_tensor(v).cpu() for k, v in mine.items()}, info)
    whole = {k: torch.cat([rank[k] for rank in everyone]) for k in mine}
    counted = all_gather_object(errors, info)

    def mean_std(values: torch.Tensor) -> tuple[float, float]:
        present = values[~values.isnan()]
        return (present.mean().item() if present.numel() else float("nan"),  # every one abstained
                present.std().item() if present.numel() > 1 else 0.0)

    out = dict(zip(("reward_mean", "reward_std"), mean_std(whole["scores"])))
    for name in per_function:
        out[f"reward/{name}_mean"], out[f"reward/{name}_std"] = mean_std(whole[f"fn/{name}"])
        out[f"reward/{name}_errors"] = sum(e.get(name, 0) for e in counted)
    return out, {k.removeprefix("more/"): v for k, v in whole.items() if k.startswith("more/")}
