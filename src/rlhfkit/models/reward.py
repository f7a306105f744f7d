"""Scalar-head models: the reward model (one score per sequence) and the critic (one per token).

Both are Hugging Face ``...ForSequenceClassification`` models with ``num_labels=1``: made from a
causal-LM folder (the SFT model; the score head starts fresh) or loaded from such a folder made
here or elsewhere, and saved so that plain transformers loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .forward import as_forward, hidden_states
from .kernels import use_fast_linear
from .load import DTYPES, ModelLoadError, check_vocab, from_folder


def is_sequence_classifier(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(path: str | Path, tokenizer, dtype: str = "fp32", seed: int = 0, device: str = "cpu"):
    """A ``num_labels=1`` sequence classifier from ``path`` (a classifier folder or a causal LM)."""
    from transformers import AutoModelForSequenceClassification

    if isinstance(path, torch.nn.Module):  # Python API: a classifier object, trained in place
        model = path
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the fresh score head of a causal-LM start is seeded
            model = from_folder(AutoModelForSequenceClassification, path, num_labels=1, dtype=DTYPES[dtype],
                                pad_token_id=tokenizer.pad_token_id)
    where = str(path) if isinstance(path, (str, Path)) else type(path).__name__
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{where}: a reward model needs num_labels=1, the model has {model.config.num_labels}")
    check_vocab(model, tokenizer, where)
    use_fast_linear(model)
    return model.to(device)


def score_name(model) -> str:
    """The attribute that holds the scalar head (``score`` for transformers' decoder classifiers)."""
    for name in ("score", "classifier", "v_head"):
        if hasattr(model, name):
            return name
    raise ModelLoadError(f"{type(model).__name__} has no score head")


def score_head(model) -> torch.nn.Module:
    return getattr(model, score_name(model))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y): the score head read at the last non-pad token. (B,)"""
    return as_forward(model, _reward_scores, input_ids, attention_mask)


def _reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return score_head(model)(last).squeeze(-1).float()


def shared_prompt_scores(model, batch) -> torch.Tensor:
    """r(x, y) for every output of a ``SharedPromptBatch`` (data/prefs.py), in slot order. (N,)"""
    return as_forward(model, _shared_prompt_scores, batch.input_ids, batch.position_ids, batch.attend, batch.last)


def _shared_prompt_scores(model, input_ids, position_ids, attend, last) -> torch.Tensor:
    hidden = hidden_states(model, input_ids, attend, position_ids)  # (P, W, H)
    return score_head(model)(hidden.flatten(0, 1)[last]).squeeze(-1).float()


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) for every position: the score head on every hidden state (the PPO critic). (B, T)"""
    return as_forward(model, lambda m, ids, mask: score_head(m)(hidden_states(m, ids, mask)).squeeze(-1).float(),
                      input_ids, attention_mask)
