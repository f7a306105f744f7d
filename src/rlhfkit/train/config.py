"""Frozen config dataclasses from YAML plus ``key=value`` overrides (``train.lr=1e-3``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop every method shares."""

    out_dir: str = "runs/out"
    max_steps: int = 100
    batch_size: int = 32  # rows per optimizer step, over all ranks
    micro_batch_size: int = 0  # rows per forward on one rank; 0 = the whole per-rank batch
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = never during training
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True


class ConfigError(ValueError):
    pass


def _convert(value, typ, key: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping")
        return build(typ, value, prefix=f"{key}.")
    try:
        if typ is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if typ in (int, float) and isinstance(value, str):
            return typ(float(value)) if typ is int and "e" in value.lower() else typ(value)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if typ in (int, float, str, bool) and not isinstance(value, typ):
            raise ValueError(value)
        return value
    except ValueError:
        raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}") from None


def build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in values.items()})


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"} (values parsed as YAML scalars)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    values: dict = {}
    if path is not None:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping")
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return build(cls, _merge(values, extra))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


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
