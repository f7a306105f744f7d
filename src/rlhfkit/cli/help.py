"""``rlhfkit METHOD --help``: every config field with its type, default and a one-line description.

Generated from the frozen config dataclasses, so it cannot drift from what the config accepts:
the description is the field's own comment in the source (on its line, or the comment lines just
above it), and for the few fields whose meaning is the same everywhere and carry no comment, the
line in ``SHARED`` below.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from importlib import resources

SHARED = {
    "tokenizer": "tokenizer folder; default: the model folder's (Python API: or a tokenizer object)",
    "eval_data": "held-out rows (a file, a saved dataset folder or a datasets.Dataset); unset = no eval",
    "max_length": "longest prompt + completion in tokens (see overlong)",
    "overlong": "rows longer than max_length: error | truncate | skip (counted and reported)",
    "eval_max_new_tokens": "greedy tokens generated per held-out prompt",
    "beta": "KL / preference temperature of the method's paper",
    "max_new_tokens": "sampled tokens per completion",
    "temperature": "sampling temperature",
    "top_k": "sample among the k most likely tokens; 0 = all",
    "top_p": "nucleus sampling mass; 1 = all",
    "eps_low": "lower clip range of the ratio (PPO's epsilon)",
    "ptx_coef": "PPO-ptx: weight of the SFT log-likelihood term",
    "kl_horizon": "adaptive KL: the horizon of the controller (Ziegler et al.)",
    "gamma": "GAE discount",
    "lam": "GAE lambda",
    "eps_clip": "policy ratio clip range",
    "eps_value": "value clip range around V_old",
    "score_scale": "reward-model scores are multiplied by this",
    "whiten_scores": "whiten reward-model scores over the batch",
    "score_clip": "clip the scores to [-score_clip, score_clip] after score_scale, missing_eos_penalty and whiten_scores; unset = no clip",
    "critic_lr": "the critic's learning rate",
    "ppo_epochs": "passes of minibatch updates over each batch of rollouts",
}

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$")


def _comments(cls) -> dict[str, str]:
    """The source comment of each field of ``cls``: trailing, else the comment lines above; a field
    ``cls`` gives a new default without a comment keeps its base class's (RLOOConfig's)."""
    out = {k: v for base in cls.__bases__ if dataclasses.is_dataclass(base) for k, v in _comments(base).items()}
    above = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "@", "class ", '"')):
            out[match.group(1)] = (match.group(2) or " ".join(above)).strip() or out.get(match.group(1), "")
        above = []
    return out


def _type_name(typ) -> str:
    if typing.get_origin(typ) in (typing.Union, __import__("types").UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(typ))
    return "None" if typ is type(None) else getattr(typ, "__name__", str(typ))


def field_rows(cls, prefix: str = "", default=None) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every field, nested configs flattened."""
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    instance = default if default is not None else cls()
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_rows(hints[f.name], f"{prefix}{f.name}.", value))
            continue
        description = comments.get(f.name) or SHARED.get(f.name, "")
        rows.append((prefix + f.name, _type_name(hints[f.name]), repr(value) if value != "" else "''", description))
    return rows


def fields_help(cls) -> str:
    """The table ``rlhfkit METHOD --help`` prints below the usage."""
    rows = field_rows(cls)
    if any(r[0] == "prompts_per_step" for r in rows):  # the online methods (refuse_offline_batch_fields)
        rows = [(n, k, d, "not read by this method: prompts_per_step sizes its batches (a value is refused)")
                if n == "train.batch_size" else (n, k, d, text) for n, k, d, text in rows]
    name_w = max(len(r[0]) for r in rows)
    kind_w = max(len(r[1]) for r in rows)
    lines = ["config fields (set in the YAML file or as key=value; nested ones with dots):"]
    for name, kind, default, description in rows:
        lines.append(f"  {name:<{name_w}}  {kind:<{kind_w}}  = {default:<10}  {description}")
    return "\n".join(lines)


def shipped_configs() -> list[tuple[str, str, str]]:
    """(name, method, one line: model <- data) of every config shipped with rlhfkit."""
    import yaml

    out = []
    for path in sorted((resources.files("rlhfkit") / "configs").iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yaml"):
            continue
        values = yaml.safe_load(path.read_text()) or {}
        name = path.name.removesuffix(".yaml")
        line = f"{values.get('model', '?')} on {values.get('train_data', '?')}"
        out.append((name, name.rsplit("_", 1)[0], line))
    return out
