"""GRPO's rewards as its config names them: shipped rule rewards, reward-model folders (``rm:PATH``),
Python callables (``module:function``, ``file.py:function``), their weights, and a process
reward (a shipped rule or ``prm:PATH``); resolved once, and recorded as the run used them.
methods/grpo.py calls these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..models.reward import is_sequence_classifier
from ..rollout.reward_models import ProcessRewardModelReward, RewardModelReward
from ..rollout.rewards import load_callable
from ..tasks import OUTCOME_REWARDS, PROCESS_REWARDS
from ..train.config import ConfigError, choice, plain_dict

if TYPE_CHECKING:
    from .grpo import GRPOConfig


def model_folder(key: str, path: str, is_kind, kind: str) -> str:
    """A learned reward's folder, checked when the config is read (before any model loads)."""
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
class Rewards:
    functions: list
    weights: list[float]
    process: object = None  # a process reward callable: PRM advantages instead of ORM


def resolve_rewards(cfg: GRPOConfig, functions=None, weights=None, process=None) -> Rewards:
    functions, parsed = (functions, None) if functions is not None else parse_rewards(cfg.rewards)
    weights = weights if weights is not None else parsed or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ConfigError(f"{len(functions)} reward functions but {len(weights)} weights")
    if process is None and cfg.process_reward and not cfg.process_reward.startswith("prm:"):
        process = PROCESS_REWARDS[cfg.process_reward]
    named = [getattr(f, "name", None) or getattr(f, "__name__", type(f).__name__) for f in functions]
    if cfg.overlong_buffer and "overlong" in named:
        raise ConfigError("a reward named 'overlong' would be logged under the name of overlong_buffer's "
                          "penalty (reward/overlong_mean); rename it")
    if (process or cfg.process_reward) and "process" in named:
        raise ConfigError("a reward named 'process' would be logged under the name of the process reward's "
                          "step rewards (reward/process_mean); rename it")
    return Rewards(list(functions), list(weights), process)


def recorded_config(cfg: GRPOConfig, rewards: Rewards, functions_passed: bool, process_passed: bool) -> dict:
    """The config as config.yaml, the checkpoints and the model card record it: the rewards passed
    from Python named in place of the config's own, which they replace (``replaced_rewards``)."""
    def name(fn) -> str:
        return getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)

    config = plain_dict(cfg)
    if functions_passed:
        config["rewards"] = ",".join(f"{name(f)}:{w:g}" for f, w in zip(rewards.functions, rewards.weights)) \
            + " (Python callables passed to run_grpo)"
    if process_passed:
        config["process_reward"] = f"{name(rewards.process)} (a Python callable passed to run_grpo)"
    return config


def replaced_rewards(cfg: GRPOConfig, functions_passed: bool, process_passed: bool) -> list[str]:
    """What the config set that the rewards passed from Python replace, to be said."""
    said = []
    if functions_passed and cfg.rewards != type(cfg).rewards:  # its default
        said.append(f"rewards={cfg.rewards!r} in the config is replaced by the reward functions passed to run_grpo")
    if process_passed and cfg.process_reward is not None:
        said.append(f"process_reward={cfg.process_reward!r} in the config is replaced by the process reward passed "
                    "to run_grpo")
    return said


def load_model_rewards(cfg: GRPOConfig, rewards: Rewards, tokenizer, device: str) -> Rewards:
    """The learned rewards' models loaded (frozen, on the policy's device); rule functions unchanged."""
    chunk = cfg.train.micro_batch_size  # rows per forward (0: the whole batch in one)
    functions = [RewardModelReward(f.path, tokenizer, device, f.name, chunk) if isinstance(f, ModelReward) else f
                 for f in rewards.functions]
    process = rewards.process
    spec = getattr(cfg, "process_reward", None)  # GRPO's; online DPO has outcome rewards only
    if process is None and spec and spec.startswith("prm:"):
        process = ProcessRewardModelReward(spec[4:], tokenizer, device, chunk)
    return Rewards(functions, rewards.weights, process)
