"""Frozen config dataclasses from YAML plus ``key=value`` overrides (``train.lr=1e-3``)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config the run refuses. ``keys``: the dotted keys it names, where the message does not say
    them as ``config key 'a.b'`` (for ``load_config`` to point at their lines)."""

    def __init__(self, message: str, keys: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys) or tuple(re.findall(r"config key '([^']+)'", message))


def choice(key: str, value, choices) -> None:
    """Refuse a value outside ``choices`` with a one-line error that lists them."""
    if value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")


def at_least(key: str, value, low, what: str = "") -> None:
    if value is not None and not value >= low:  # NaN fails too
        raise ConfigError(f"config key '{key}' must be >= {low}{what}; got {value!r}")


def used_only_with(key: str, value, default, used: bool, by: str) -> None:
    """Refuse a setting changed from its default where nothing reads it (``used`` False), rather
    than run without it: ``by`` says what would read it."""
    if not used and value != default:
        raise ConfigError(f"{key}={value} is used by {by} only, which is off; set it or leave {key} out", keys=[key])


def all_used_only_with(cfg, keys: tuple[str, ...], used: bool, by: str) -> None:
    """``used_only_with`` for several keys at once: every one of ``keys`` that ``cfg`` sets away from
    its default, in one error with the defaults that leave them out (a shipped YAML's values are
    overridden so, e.g. to turn its eval off). A key may be dotted (``train.eval_every``)."""
    def value_and_default(key: str):
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        return getattr(node, name), getattr(type(node), name)

    found = {k: value_and_default(k) for k in keys}
    changed = [k for k, (value, default) in found.items() if value != default]
    if used or not changed:
        return
    values = ", ".join(f"{k}={found[k][0]}" for k in changed)
    defaults = " ".join(f"{k}={'null' if found[k][1] is None else found[k][1]}" for k in changed)
    raise ConfigError(f"{values} {'is' if len(changed) == 1 else 'are'} used by {by} only, which is off; turn it on, or "
                      f"leave {'it' if len(changed) == 1 else 'them'} out ({defaults})", keys=changed)


def check_sampling_correction(cfg, modes: tuple[str, ...]) -> None:
    """GRPO's and PPO's ``sampling_correction`` (one of ``modes``) and its bounds
    ``sampling_correction_min`` / ``_max`` (defaults None and 3.0)."""
    choice("sampling_correction", cfg.sampling_correction, modes)
    at_least("sampling_correction_min", cfg.sampling_correction_min, 0)
    low, high = cfg.sampling_correction_min, cfg.sampling_correction_max
    positive("sampling_correction_max", high)  # 0 or below would weigh every sample 0
    if None not in (low, high) and not high > low:
        raise ConfigError("config key 'sampling_correction_max' must be > sampling_correction_min")
    if cfg.sampling_correction.endswith("truncate") and low is None and high is None:
        raise ConfigError(f"sampling_correction={cfg.sampling_correction} truncates the weights to "
                          "[sampling_correction_min, sampling_correction_max]; give at least one bound")
    if cfg.sampling_correction == "none":
        used_only_with("sampling_correction_min", low, None, False, "sampling_correction other than none")
        used_only_with("sampling_correction_max", high, 3.0, False, "sampling_correction other than none")


def check_reference_sync(cfg) -> None:
    """TR-DPO's keys (TRL's names), in DPO and GRPO: ``sync_ref_model``, ``ref_model_mixup_alpha``
    in (0, 1] and ``ref_model_sync_steps`` >= 1, the last two only with the first; not with LoRA,
    whose reference is the base model with the adapters off (TRL refuses PEFT with it too)."""
    within("ref_model_mixup_alpha", cfg.ref_model_mixup_alpha, 0, 1, open_low=True)
    at_least("ref_model_sync_steps", cfg.ref_model_sync_steps, 1)
    all_used_only_with(cfg, ("ref_model_mixup_alpha", "ref_model_sync_steps"), cfg.sync_ref_model,
                       "TR-DPO's reference sync (sync_ref_model=true)")
    if cfg.sync_ref_model and cfg.lora.enabled:
        raise ConfigError("sync_ref_model=true with LoRA: the reference is the base model with the adapters off, "
                          "no copy of its own to move (TRL refuses it with PEFT too); set lora.r=0",
                          keys=["sync_ref_model", "lora.r"])


def within(key: str, value, low, high, open_low: bool = False) -> None:
    """``low <= value <= high`` (``low < value`` when ``open_low``); None passes (an unset option)."""
    if value is None:
        return
    if not ((value > low if open_low else value >= low) and value <= high):
        bracket = "(" if open_low else "["
        raise ConfigError(f"config key '{key}' must be in {bracket}{low}, {high}]; got {value!r}")


def positive(key: str, value, what: str = "") -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"config key '{key}' must be > 0{what}; got {value!r}")


SCHEDULES = ("cosine", "constant", "linear")
TRAIN_DTYPES = ("fp32", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop every method shares."""

    out_dir: str = "runs/out"  # each method's config gives its own default (runs/sft, runs/dpo, ...)
    # SFT, RM, DPO, KTO, PRM: optimizer steps. GRPO, RLOO, PPO, distill: rollout steps (each gives mu, or
    # ppo_epochs, x minibatches optimizer steps; distill one); the progress bar, the logs and result.json name the unit.
    max_steps: int = 100
    epochs: float = 0  # > 0: passes over the training data instead of max_steps (steps = ceil(epochs x rows / batch))
    batch_size: int = 32  # rows per optimizer step, over all ranks (SFT, RM, DPO, KTO, PRM; GRPO/RLOO/PPO/distill: prompts_per_step)
    micro_batch_size: int = 0  # rows per forward on one rank; 0 = the whole per-rank batch
    lr: float = 1e-4  # peak learning rate (AdamW)
    schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 0  # always counts optimizer steps
    min_lr_ratio: float = 0.0  # the schedule's floor, as a fraction of lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # 0 = no clipping
    dtype: str = "fp32"  # fp32 | bf16 (autocast for the trained forwards; master weights stay fp32)
    strategy: str = "replicate"  # replicate (whole model on every rank) | fsdp (FSDP2 sharding, train/shard.py)
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda
    seed: int = 0  # weights' fresh parts, data order, sampling (each rank adds its rank)
    log_every: int = 10  # steps between lines of metrics.jsonl (each line: the means over those steps)
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2  # 0 = keep all (a transient one, written for an eval off save_every, still goes)
    resume: bool | str = False  # true | false | auto (when a complete checkpoint exists) | force (true; a refused change only said)
    progress: bool = True  # a progress bar with ETA on stderr (false: transformers' loading bars off too)
    report_to: str = "tensorboard"  # tensorboard | wandb (WANDB_MODE=offline works) | none; metrics.jsonl always
    plots: bool = True  # PNG curves of metrics.jsonl in <out>/plots at the end (train/plots.py)
    activation_checkpointing: bool = False  # recompute the trained models' layer activations in the backward
    # a mixture of experts' router load-balancing loss, added by SFT, DPO and GRPO as TRL's (TRL's name):
    # None = the model config's own coefficient, 0 = off
    router_aux_loss_coef: float | None = None

    def __post_init__(self):
        choice("train.schedule", self.schedule, SCHEDULES)
        choice("train.dtype", self.dtype, TRAIN_DTYPES)
        choice("train.strategy", self.strategy, ("replicate", "fsdp"))
        choice("train.device", self.device, ("auto", "cpu", "cuda"))
        choice("train.report_to", self.report_to, REPORT_TO)
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ConfigError("config key 'train.report_to' is wandb but wandb is not installed (pip install wandb); "
                              "use tensorboard or none")
        if not (isinstance(self.resume, bool) or self.resume in ("auto", "force")):
            raise ConfigError(f"config key 'train.resume' must be one of true, false, auto, force; got {self.resume!r}")
        if self.router_aux_loss_coef is not None and not math.isfinite(self.router_aux_loss_coef):
            raise ConfigError(f"config key 'train.router_aux_loss_coef' must be finite; got {self.router_aux_loss_coef}")
        for key in ("max_steps", "batch_size", "log_every"):  # max_steps=0 would save a copy of the start model
            at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("epochs", "micro_batch_size", "warmup_steps", "eval_every", "save_every", "keep_checkpoints",
                    "weight_decay", "max_grad_norm", "seed", "router_aux_loss_coef"):
            at_least(f"train.{key}", getattr(self, key), 0)
        within("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        positive("train.lr", self.lr)
        if self.out_dir == "":
            raise ConfigError("config key 'train.out_dir' is empty")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the trained models (models/lora.py); ``r=0`` trains every weight."""

    r: int = 0  # adapter rank; 0 = no adapters (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    # every linear layer of the decoder (not the output head; as peft's all-linear picks them), or
    # "q_proj,v_proj" (in YAML also a list)
    target_modules: str | list[str] = "all-linear"
    merge: bool = False  # also save the merged model: <out>/model merged, the adapter in <out>/model/adapter

    def __post_init__(self):
        at_least("lora.r", self.r, 0)
        if not self.alpha > 0:
            raise ConfigError(f"config key 'lora.alpha' must be > 0; got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'lora.dropout' must be in [0, 1); got {self.dropout!r}")
        if isinstance(self.target_modules, (list, tuple)):  # a YAML list: kept as the one text form
            if not all(isinstance(t, str) for t in self.target_modules):
                raise ConfigError(f"config key 'lora.target_modules' must list module names; got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", ",".join(t.strip() for t in self.target_modules))
        if not isinstance(self.target_modules, str):
            raise ConfigError(f"config key 'lora.target_modules' must be all-linear or module names; "
                              f"got {self.target_modules!r}")
        if not self.target_modules.strip():
            raise ConfigError("config key 'lora.target_modules' is empty; use all-linear or a comma-separated list")
        if self.r == 0:  # LoRA off: its other settings would be silently unused
            unused = [f"lora.{f.name}" for f in dataclasses.fields(self)
                      if f.name != "r" and getattr(self, f.name) != f.default]
            if unused:
                raise ConfigError(f"{', '.join(unused)} set but lora.r is 0 (no adapters, every weight trained): set "
                                  "lora.r (e.g. lora.r=16) to train LoRA adapters, or leave them out", keys=unused)

    @property
    def enabled(self) -> bool:
        return self.r > 0


ROLLOUT_BACKENDS = ("sampler", "generate", "vllm")


@dataclass(frozen=True)
class RolloutConfig:
    """Where GRPO and PPO generate (rollout/backend.py)."""

    backend: str = "sampler"  # sampler | generate (transformers) | vllm (a colocated vLLM engine, GPU)
    gpu_memory_utilization: float = 0.3  # vllm: the share of the GPU its engine may take (weights + KV cache)
    tensor_parallel_size: int = 1  # vllm: GPUs one engine spans
    sleep: bool = True  # vllm: release its memory while the trainer runs (when the installed vLLM can)

    def __post_init__(self):
        choice("rollout.backend", self.backend, ROLLOUT_BACKENDS)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"config key 'rollout.gpu_memory_utilization' must be in (0, 1]; "
                              f"got {self.gpu_memory_utilization!r}")
        at_least("rollout.tensor_parallel_size", self.tensor_parallel_size, 1)
        changed = [k for k in ("gpu_memory_utilization", "tensor_parallel_size", "sleep")
                   if getattr(self, k) != getattr(RolloutConfig, k)]
        if self.backend != "vllm" and changed:  # the engine's knobs: another backend would run without them
            raise ConfigError(f"{', '.join(f'rollout.{k}={getattr(self, k)}' for k in changed)} "
                              f"{'is' if len(changed) == 1 else 'are'} read by rollout.backend=vllm only, and "
                              f"rollout.backend is {self.backend}: set rollout.backend=vllm, or leave "
                              f"{'it' if len(changed) == 1 else 'them'} out", keys=[f"rollout.{k}" for k in changed])
        if self.backend == "vllm":
            from ..rollout.vllm import vllm_unavailable

            reason = vllm_unavailable()
            if reason:
                raise ConfigError(f"config key 'rollout.backend' is vllm but {reason}; use sampler or generate")


@dataclasses.dataclass(frozen=True)
class Override:
    """A command-line value: its text, and the YAML scalar it parses to. A text field takes the
    text as typed (``step_separator='; '`` keeps its space, ``step_separator=$'\\n'`` in bash is a
    newline, ``out_dir=2024`` is a name)."""

    text: str
    parsed: object


def _convert(value, typ, key: str, default=None):
    if isinstance(value, Override):
        text_field = typ is str or (typing.get_origin(typ) in (typing.Union, types.UnionType)
                                    and {a for a in typing.get_args(typ) if a is not type(None)} == {str})
        typed_blank = bool(value.text) and not value.text.strip()  # a newline or spaces: YAML reads null
        listed = isinstance(value.parsed, list) and key.split(".")[-1] in COMMA_LISTS  # loss_type=[a, b]
        value = value.text if text_field and not listed and (value.parsed is not None or typed_blank) else value.parsed
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for arg in args[:-1]:  # the first type that takes the value (bool | str: true, false, auto)
            try:
                return _convert(value, arg, key, default)
            except ConfigError:
                pass
        return _convert(value, args[-1], key, default)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping")
        base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
        return build(typ, {**base, **value}, prefix=f"{key}.")
    if origin is tuple:  # a fixed number of items (a YAML list): tuple[float, float]
        items = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"config key '{key}' expects a list of {len(items)} "
                              f"({', '.join(getattr(t, '__name__', str(t)) for t in items)}), got {value!r}")
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if typ is str and isinstance(value, list) and key.split(".")[-1] in COMMA_LISTS and \
            all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(map(str, value))  # TRL's list form ([sigmoid, nca_pair]) of a comma-separated key
    try:
        if typ is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if typ in (int, float) and isinstance(value, str):
            if typ is int and "e" in value.lower():
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                return int(number)
            return typ(value)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if typ in (int, float, str, bool) and not isinstance(value, typ):
            raise ValueError(value)
        return value
    except ValueError:
        raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}") from None


# keys whose text is a comma-separated list: a YAML list is read as one (TRL writes them as lists)
COMMA_LISTS = ("loss_type", "rewards")


# TRL's (and transformers' TrainingArguments') names for what rlhfkit calls otherwise: said
# beside an unknown key, for a config brought over from TRL
TRL_NAMES = {"learning_rate": "train.lr", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
             "per_device_train_batch_size": "train.batch_size (the whole batch, split over ranks)",
             "gradient_accumulation_steps": "train.micro_batch_size (rows per forward: the batch over the steps)",
             "output_dir": "train.out_dir", "logging_steps": "train.log_every", "save_steps": "train.save_every",
             "eval_steps": "train.eval_every", "save_total_limit": "train.keep_checkpoints",
             "eval_strategy": "train.eval_every (steps between evals; 0: at the end only)",
             "save_strategy": "train.save_every (steps between checkpoints; 0: at the end only)",
             "logging_strategy": "train.log_every (steps between metrics lines)",
             "per_device_eval_batch_size": "nothing: held-out rows are forwarded 64 at a time (greedy answers 256)",
             "local_rollout_forward_batch_size": "train.micro_batch_size (rows per forward; it bounds the update's "
                                                 "forwards too)",
             "lr_scheduler_type": "train.schedule", "warmup_ratio": "train.warmup_steps (a number of steps)",
             "gradient_checkpointing": "train.activation_checkpointing", "bf16": "train.dtype (bf16 or fp32)",
             "num_generations": "group_size", "max_completion_length": "max_new_tokens", "num_iterations": "mu",
             "epsilon": "eps_low", "epsilon_high": "eps_high (with loss_type=cispo TRL's is the cap itself, 1 + eps_high here)",
             "vllm_importance_sampling_correction": "sampling_correction (none: off; any inexact backend, not vllm only)",
             "vllm_importance_sampling_mode": "sampling_correction (the same four modes)",
             "vllm_importance_sampling_clip_max": "sampling_correction_max",
             "vllm_importance_sampling_clip_min": "sampling_correction_min",
             "reward_funcs": "rewards (names or module:function, comma-separated)",
             "reward_weights": "rewards (name:weight, comma-separated)",
             "precompute_ref_log_probs": "reference (precompute, rlhfkit's default, or forward)",
             "truncation_mode": "overlong (error, truncate or skip; truncate keeps the start)",
             "loss_weights": "loss_type (name:weight, comma-separated: sigmoid:0.8,nca_pair:0.2; an sft term is rpo_alpha)",
             "model_name_or_path": "model", "dataset_name": "train_data (a local file or save_to_disk folder)",
             "train_dataset": "train_data (a local file or save_to_disk folder)", "eval_dataset": "eval_data",
             "cliprange": "eps_clip", "cliprange_value": "eps_value", "vf_coef": "critic_lr (the value loss has weight 1 and the critic its own learning rate, its gradients clipped "
                         "apart from the actor's: from TRL's vf_coef with one learning rate, set critic_lr to that lr)",
             "num_ppo_epochs": "ppo_epochs",
             "num_mini_batches": "minibatch_size (rows per optimizer step: prompts_per_step / num_mini_batches)",
             "total_episodes": "train.max_steps (rollout steps: total_episodes / prompts_per_step)",
             "whiten_rewards": "whiten_scores (the reward model's scores, before the KL term, mean removed; TRL's whitens the per-token rewards, KL included, keeping their mean)",
             "reward_model_path": "reward_model", "sft_model_path": "model",
             "stop_token": "nothing: rollouts always stop at the tokenizer's EOS (TRL's stop_token='eos')",
             "stop_token_id": "nothing: rollouts stop at the tokenizer's EOS (set the tokenizer's eos_token to the one to stop at)",
             "response_length": "max_new_tokens", "max_prompt_length": "max_length (prompt and answer together)",
             "use_vllm": "rollout.backend=vllm (a colocated engine; TRL's server mode is not here)",
             "vllm_gpu_memory_utilization": "rollout.gpu_memory_utilization",
             "vllm_tensor_parallel_size": "rollout.tensor_parallel_size",
             "vllm_enable_sleep_mode": "rollout.sleep",
             "repetition_penalty": "nothing: samples are the policy's (logits / temperature, top_k, top_p), which the losses read",
             "min_p": "nothing: the sampler has top_k and top_p",
             "generation_kwargs": "nothing: the sampler takes temperature, top_k and top_p",
             "log_completions": "nothing: the evals of SFT, DPO, CPO, ORPO and KTO (eval_prompts), and of GRPO, RLOO, "
                                "PPO, online DPO and distillation (eval_data) write eval_samples.jsonl (8 held-out "
                                "prompts and their answers)",
             "num_completions_to_print": "nothing: eval_samples.jsonl holds 8 held-out answers at each eval",
             "center_rewards_coefficient": "center_coef (the same scale)",
             "padding_free": "packing (padding-free packed rows, per-sequence positions)",
             "assistant_only_loss": "completion_only_loss (true, the default here: the assistant turns alone; false: every "
                                   "token, TRL's default for messages)",
             "dataset_text_field": "nothing: a row's 'text' (or 'messages') field is read by its name",
             "steps_per_generation": "minibatch_size (prompts per optimizer step: prompts_per_step x "
                                     "gradient_accumulation_steps / steps_per_generation; unset, one step a batch, "
                                     "TRL's default)",
             "generation_batch_size": "prompts_per_step (= generation_batch_size / num_generations: TRL counts "
                                      "completions, rlhfkit prompts)",
             "trust_remote_code": "nothing: models load with transformers' own classes, never a folder's code",
             "model_init_kwargs": "nothing: a model folder loads as saved (train.dtype sets the trained precision)",
             "dataset_num_proc": "nothing: rows are read and encoded in one process, before training",
             "dataset_kwargs": "nothing: data is a local file or save_to_disk folder, read as it is",
             "pad_to_multiple_of": "nothing: a batch is padded to its longest row (packing=true for none at all)",
             "pad_token": "tokenizer (a folder whose tokenizer has the pad token; without one, pad is EOS)",
             "eos_token": "tokenizer (a folder whose tokenizer has that EOS)",
             "chat_template_path": "tokenizer (a folder whose tokenizer holds the chat template: chat_template.jinja "
                                   "or tokenizer_config.json)",
             "remove_unused_columns": "nothing: a row's other fields are passed to the reward functions by name",
             "chat_template_kwargs": "nothing: chat prompts are rendered with the template's own defaults",
             "log_unique_prompts": "nothing: metrics.jsonl logs the step's rewards; eval_samples.jsonl 8 held-out "
                                   "answers",
             "max_tool_calling_iterations": "nothing: rollouts are one completion each (no tool calls executed)",
             "vllm_importance_sampling_cap": "sampling_correction_max",
             "use_transformers_paged": "rollout.backend (sampler: rlhfkit's KV-cache sampler; generate: transformers')",
             "use_transformers_continuous_batching": "rollout.backend (sampler: rlhfkit's KV-cache sampler; generate: "
                                                     "transformers')",
             "cache_implementation": "nothing: the sampler keeps its own KV cache",
             "vllm_model_impl": "nothing: the vllm engine loads the model with vLLM's own implementation",
             "vllm_structured_outputs_regex": "nothing: samples are unconstrained (the losses read the policy's "
                                              "distribution)",
             "ds3_gather_for_generation": "nothing: under train.strategy=fsdp the sampler gets the gathered weights",
             "activation_offloading": "train.activation_checkpointing (recomputes, does not offload)",
             "packing_strategy": "packing (first-fit decreasing, TRL's bfd, into rows of max_length)",
             "eval_packing": "nothing: the held-out loss is computed on padded rows",
             "precompute_ref_batch_size": "nothing: the reference is precomputed 64 rows a forward",
             "num_generations_eval": "nothing: evals score one greedy answer per held-out prompt",
             "cast_lm_head_to_fp32": "nothing: log-probs are computed from fp32 logits always",
             "vllm_server_base_url": "nothing: TRL's vLLM server mode is not here (rollout.backend=vllm is colocated)",
             "vllm_server_host": "nothing: TRL's vLLM server mode is not here (rollout.backend=vllm is colocated)",
             "vllm_server_port": "nothing: TRL's vLLM server mode is not here (rollout.backend=vllm is colocated)",
             "vllm_max_model_length": "nothing: the engine's length is the model's own (prompts and answers are "
                                      "checked against it before training)",
             "vllm_mode": "rollout.backend=vllm (an engine colocated with the trainer; TRL's server mode is not here)",
             "disable_dropout": "nothing: every method but SFT and the PRM trains with dropout off (RM, DPO, CPO, "
                                "ORPO, online DPO, KTO, GRPO, RLOO, PPO, distillation; TRL turns it off by default in RM, DPO, "
                                "CPO and ORPO, and in GRPO and distillation only with disable_dropout=true); LoRA's "
                                "lora.dropout is off in those methods too",
             "is_encoder_decoder": "nothing: rlhfkit trains decoder-only causal LMs",
             "use_peft": "lora.r (adapters are on where lora.r > 0)", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
             "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules",
             "num_labels": "nothing: a reward model has one output, its score (TRL's RewardTrainer sets num_labels=1; "
                           "the PRM's num_labels picks its head)",
             "shuffle_dataset": "nothing: the rows are shuffled each epoch, by train.seed",
             "teacher_model_name_or_path": "teacher",
             "cpo_alpha": "rpo_alpha (the chosen answers' NLL per token; `rlhfkit cpo` and `rlhfkit orpo` weigh it 1)",
             "reference_free": "reference=none (`rlhfkit cpo` and `rlhfkit orpo` set it)"}
for _name in ("max_grad_norm", "seed", "weight_decay", "warmup_steps", "report_to", "router_aux_loss_coef"):
    TRL_NAMES[_name] = f"train.{_name}"
for _name in ("vllm_server_timeout", "vllm_group_port"):
    TRL_NAMES[_name] = TRL_NAMES["vllm_server_host"]


# TRL's names as GRPO and RLOO read them, where other methods read them otherwise; the old RLOOTrainer's
# (TRL before 0.20, PPO-like) among them
ONLINE_NAMES = {"max_prompt_length": "nothing: GRPO's and RLOO's prompts are not cut (one longer than the model's "
                                     "positions is refused before training, with its row)",
                "rloo_k": "group_size", "kl_coef": "beta (with advantage_estimator=rloo in the reward)",
                "cliprange": "eps_low", "num_ppo_epochs": "mu",
                "reward_model_path": "rewards (rm:PATH, a reward model as a reward)",
                "token_level_kl": "nothing: RLOO's KL is the answer's, in its reward (TRL's RLOO since 0.20)",
                "normalize_reward": "nothing: rewards are used as scored (normalize_advantages for the advantages)",
                "whiten_rewards": "normalize_advantages (with advantage_estimator=rloo)"}


# rlhfkit's own keys that were renamed: said beside an unknown key, for a config written before
RENAMED = {"scale_std": "scale_rewards (scale_std=true is scale_rewards=group, false is none)"}


# TRL's names whose hint holds only for the method that has this field (DPO's weighted loss forms, GRPO's groups)
HINT_ONLY_WITH = {"loss_weights": "rpo_alpha", "steps_per_generation": "group_size",
                  "generation_batch_size": "group_size", "num_generations_eval": "group_size",
                  "packing_strategy": "packing",
                  "eval_packing": "packing", "precompute_ref_batch_size": "rpo_alpha"}


# TRL's names whose answer depends on the method reading them, each winning over TRL_NAMES where it
# applies (the first that does): (names, a field the method has or None, a field it lacks or None, answer)
BY_METHOD = [
    *(((k,), "ties", None, v) for k, v in {  # online DPO (TRL's OnlineDPOTrainer)
        "reward_model_path": "rewards (rm:PATH, a reward model as the judge of each pair)",
        "reward_funcs": "rewards (name[:weight],...; from Python: run_online_dpo(cfg, reward_fns=[...]))",
        "judge": "nothing: each pair is judged by its rewards (functions or rm:PATH); an LLM judge can be a reward "
                 "function of yours",
        "num_generations": "nothing: online DPO samples two answers a prompt, a pair, as TRL's",
        "per_device_train_batch_size": "prompts_per_step (prompts a step, over all ranks, two answers each; TRL's "
                                       "OnlineDPO batch is per_device x ranks x gradient_accumulation_steps prompts)",
        "max_length": "nothing: prompts are not cut (one longer than the model's positions with max_new_tokens is "
                      "refused before training, with its row)"}.items()),
    (("padding_free",), None, "packing",  # DPO's and GRPO's own padding-free layout
     "share_prompt (each prompt once, then its answers, no padding between them; on by default)"),
    (("precompute_ref_log_probs", "precompute_ref_batch_size"), "desirable_weight", None,  # KTO
     "nothing: KTO forwards its reference every step, for the mismatched pairs too (TRL's default)"),
    *(((k,), "group_size", None, v) for k, v in ONLINE_NAMES.items()),  # GRPO and RLOO, and TRL's RLOO before 0.20
    (("max_completion_length", "max_prompt_length"), "max_length", "group_size", "max_length (prompt and answer together)"),
    (("num_generations",), "teacher", None,  # distillation
     "nothing: one answer per prompt, as TRL's DistillationTrainer samples (prompts_per_step sets how many)"),
    (("teacher_model_init_kwargs",), "teacher", None, "nothing: the teacher loads in train.dtype"),
    (("alpha",), "simpo_gamma", None,  # TRL's CPOConfig
     "alphapo_alpha for TRL's CPO alpha (AlphaPO's reward shape: `rlhfkit cpo loss_type=simpo alphapo_alpha=A "
     "rpo_alpha=0`); beta for the ORPO paper code's alpha (its lambda; TRL's ORPO beta)"),
    (("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"), "desirable_weight", None,  # TRL's KTO has them
     "nothing: KTO's reference stays the start model (TR-DPO's sync is DPO's and GRPO's here)"),
    (("max_length",), "teacher", None,  # GKDTrainer's (an SFTConfig's): distillation's length is the answers'
     "max_new_tokens (each answer's, sampled or read; prompts are not cut, one past the model's positions is refused)"),
    (("per_device_train_batch_size",), "teacher", None,  # distillation: one answer a prompt
     "prompts_per_step (prompts a step, over all ranks, one answer each; TRL's distillation batch is "
     "per_device x ranks x gradient_accumulation_steps prompts)"),
    (("per_device_train_batch_size",), "group_size", None,  # GRPO and RLOO count prompts
     "prompts_per_step (prompts a step, over all ranks; TRL's GRPO and RLOO count completions per device: "
     "prompts = per_device x ranks x steps_per_generation / num_generations)"),
    (("per_device_train_batch_size",), "prompts_per_step", None,  # PPO counts prompts, one answer each
     "prompts_per_step (prompts a step, over all ranks, one answer each; TRL's PPO batch is per_device x ranks x "
     "gradient_accumulation_steps prompts)"),
]


def _trl_hint(key: str, prefix: str, names: set[str]) -> str | None:
    """rlhfkit's name for TRL's ``key``, where the config being read (its fields ``names``, under
    ``prefix``) has it."""
    own = next((answer for keys, has, lacks, answer in BY_METHOD
                if key in keys and (has is None or has in names) and lacks not in names), None)
    if own is None and key in HINT_ONLY_WITH and HINT_ONLY_WITH[key] not in names:
        return None
    hint = own or TRL_NAMES.get(key)
    if hint is None or hint.startswith("nothing"):
        return hint
    target = hint.split(" ")[0].split("=")[0]
    here = target[len(prefix):] if target.startswith(prefix) else None
    return hint if here is not None and here.split(".")[0] in names and target != prefix + key else None


def _unknown(cls, values: dict, prefix: str) -> list[tuple[str, list[str], set[str]]]:
    """(prefix, its unknown keys, its known names) for each level of the nested dict ``values``
    that has keys ``cls`` lacks: every level at once, so one run names them all."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    out = [(prefix, unknown, names)] if unknown else []
    for key in sorted(set(values) & names):
        if isinstance(values[key], dict) and dataclasses.is_dataclass(hints[key]):
            out += _unknown(hints[key], values[key], f"{prefix}{key}.")
    return out


def _key_paths(cls, prefix: str = "") -> list[str]:
    """Every key of ``cls`` as config files name it, nested dataclasses' as ``train.lr``."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _key_paths(hints[f.name], f"{prefix}{f.name}.")
    return out


def _near_key(cls, key: str, at: str, names: set) -> str | None:
    """The key an unknown ``at + key`` likely meant: the same name at another level (``lr`` ->
    ``train.lr``), else a close spelling at its own (``bata`` -> ``beta``; ``data`` -> ``train_data``)."""
    elsewhere = [p for p in _key_paths(cls) if p.rsplit(".", 1)[-1] == key and p != at + key]
    if elsewhere:
        return min(elsewhere, key=len)
    if "train_" + key in names:  # data -> train_data, not the as-close eval_data
        return at + "train_" + key
    match = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return at + match[0] if match else None


def build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys by name, those of
    every nesting level in one error (with rlhfkit's name for a key TRL names so)."""
    levels = _unknown(cls, values, prefix)
    if levels:
        found, renamed, trl, close, known = [], [], [], [], []
        for at, unknown, names in levels:
            found += [at + k for k in unknown]
            renamed += [f"{at}{k} -> {RENAMED[k]}" for k in unknown if k in RENAMED and RENAMED[k].split()[0] in names]
            trl += [f"{at}{k} -> {hint}" for k in unknown if (hint := _trl_hint(k, at, names)) is not None]
            told = {r.split(" -> ")[0] for r in renamed + trl}
            close += [f"{at}{k} -> {guess}" for k in unknown if at + k not in told
                      and (guess := _near_key(cls, k, at, names)) is not None]
            known.append(f"known{f' under {at[:-1]}' if at else ''}: {', '.join(sorted(names))}")
        raise ConfigError(f"unknown config key(s): {', '.join(found)}; "
                          + (f"renamed: {'; '.join(renamed)}; " if renamed else "")
                          + (f"TRL's names, rlhfkit's: {'; '.join(trl)}; " if trl else "")
                          + (f"did you mean: {'; '.join(close)}; " if close else "")
                          + "; ".join(known), keys=found)
    hints = typing.get_type_hints(cls)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    converted, errors = {}, []
    for k, v in values.items():  # every value's type error at once, as the unknown keys are
        try:
            converted[k] = _convert(v, hints[k], prefix + k, defaults[k])
        except ConfigError as e:
            errors.append(e)
    if errors:
        raise ConfigError("; ".join(map(str, errors)), keys=[k for e in errors for k in e.keys])
    return cls(**converted)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": Override("1", 1)}, "c": Override("x", "x")}: each value's
    text and its YAML scalar, for ``_convert`` to take the one its field's type wants."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r}: a key before '=' is missing (key=value, e.g. train.lr=1e-4)")
        try:
            value = Override(raw, yaml.safe_load(raw) if raw else "")
        except yaml.YAMLError:
            value = raw  # not a YAML scalar: kept as text, for the typed conversion to judge
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' was given a value and cannot also have keys")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """The config ``cls`` from the YAML file ``path`` and ``overrides`` (``key=value`` texts, or a
    nested dict) over it. An error about a key the file sets (and no override replaces) starts with
    the file and that key's line: ``run.yaml:7: config key 'train.lr' expects float, got 'abc'``."""
    values: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        try:
            with open(path) as f:
                text = f.read()
            values = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            place = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{place}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping")
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    try:
        merged = _merge(values, extra)
        cfg = build(cls, merged)
        texts = {k: v.text if isinstance(v, Override) else v for k, v in flat(merged).items()}
        unread = getattr(cls, "UNREAD", {})  # keys of another kind of method: set to anything, even the default
        given = [k for k in texts if k in unread]
        if given:
            raise ConfigError("; ".join(f"config key '{k}' does not apply here ({unread[k]})" for k in given),
                              keys=given)
        described = [k for k, v in texts.items() if _is_data_field(k.rsplit(".", 1)[-1]) and isinstance(v, str)
                     and v.startswith("<") and v.endswith(">")]
        if described:  # a run's config.yaml records rows given in Python so (plain_dict): no file to read again
            raise ConfigError(f"config key '{described[0]}' is {texts[described[0]]!r}, the record of rows passed "
                              "from Python, which a config cannot hold; give a file or folder of them",
                              keys=described[:1])
        return cfg
    except ConfigError as e:
        from_file = set(lines) - set(flat(extra))
        where = sorted({lines[k] for k in e.keys if k in from_file})
        if not where:
            raise
        place = f":{where[0]}" if len(where) == 1 else f" (lines {', '.join(map(str, where))})"
        raise ConfigError(f"{path}{place}: {e}", keys=e.keys) from None


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """The line (1-based) of each dotted key in a composed YAML mapping, nested ones too."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            out[name] = key.start_mark.line + 1
            out.update(_key_lines(value, f"{name}."))
    return out


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# What a resumed run may set anew: where and how it runs (layouts that compute the same update),
# how often it logs, evaluates and saves, how long it goes on, its evals, what stops it and its
# rollout engine. Any other key would change what the steps after the checkpoint compute against
# those before it, which the checkpoint's optimizer, schedule and place in the data would not follow
# (its lr, data and batch size would win silently): refused.
# ``train.resume=force`` says a refused change instead, for a user who knows it is harmless (the
# data moved to another mount).
RESUMABLE = ("train.resume", "train.out_dir", "train.max_steps", "train.epochs", "train.micro_batch_size",
             "train.strategy", "train.device", "train.log_every", "train.eval_every", "train.save_every",
             "train.keep_checkpoints", "train.progress", "train.report_to", "train.plots",
             "train.activation_checkpointing", "rollout.", "eval_", "stop_at_accuracy", "snapshot_at_accuracy",
             "share_prompt", "packing", "skip_zero_advantage", "reward_timeout_s", "reward_errors", "lora.merge")
# Keys a resumed run may change only between values that compute the same update: DPO's reference
# log-probs computed once or forwarded every step (not ``none``, which drops the reference from the
# loss: DPO becomes reference-free, CPO becomes DPO)
RESUMABLE_BETWEEN = {"reference": ("precompute", "forward")}
LENGTH_KEYS = ("train.max_steps", "train.epochs")  # a changed one stretches or shortens the lr schedule from here


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(a, b) -> bool:
    """Equal values, or two spellings of one existing path (``./m``, ``m``, ``/abs/m``)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:
        try:
            return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
        except OSError:
            return False
    return False


def resume_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """The keys set in both configs whose values differ, as "key: saved -> now": those a resumed run
    may change (``RESUMABLE``), and the rest."""
    before, after = flat(saved), flat(now)
    changed = [k for k in after if k in before and k != "train.resume" and not _same(before[k], after[k])]
    said = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed]
    allowed = [k.startswith(RESUMABLE) or (k in RESUMABLE_BETWEEN and {before[k], after[k]} <= set(RESUMABLE_BETWEEN[k]))
               for k in changed]
    return [d for d, ok in zip(said, allowed) if ok], [d for d, ok in zip(said, allowed) if not ok]


def plain_dict(config) -> dict:
    """The config as YAML-safe values; an object in a field (a ``datasets.Dataset`` passed as
    ``train_data``) is written as a short description instead of failing at the first save. The
    keys its method does not read (``UNREAD``) are left out, so that the saved ``config.yaml``
    loads back as a config."""
    out = _plain(config)
    for key in getattr(type(config), "UNREAD", ()):
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return out


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _described(getattr(value, f.name)) if _is_data_field(f.name) else _plain(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    size = f", {len(value)} rows" if hasattr(value, "__len__") else ""
    return f"<{type(value).__module__}.{type(value).__name__}{size}>"


def _is_data_field(name: str) -> bool:
    return name.endswith("_data") or name == "eval_prompts"


def _described(value):
    """A data source as the record holds it: a path as it is, rows given in Python as a short
    description (not every value they hold)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        rows = len(next(iter(value.values()), []))
        return f"<dict of {len(value)} columns, {rows} rows>"
    if isinstance(value, list):
        return f"<list of {len(value)} rows>"
    return _plain(value)


def replace(config, **changes):
    """A copy of a (nested) frozen config with ``a__b=value`` style nested changes."""
    nested: dict = {}
    for key, value in changes.items():
        head, _, rest = key.partition("__")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    for head, sub in list(nested.items()):
        if isinstance(sub, dict) and dataclasses.is_dataclass(getattr(config, head)):
            nested[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **nested)
