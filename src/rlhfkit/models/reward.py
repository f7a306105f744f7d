"""Score-head models: the reward model (one score per sequence), the critic (one per token) and
the process reward model (one per step).

The first two are Hugging Face ``...ForSequenceClassification`` models with ``num_labels=1``, the
PRM a ``...ForTokenClassification`` (1 or 2 labels): made from a causal-LM folder (the SFT
model; the head starts fresh) or loaded from such a folder made here or elsewhere, and saved so
that plain transformers loads them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..data.encode import row_chunks
from ..losses.prm import step_logit
from .forward import as_forward, flat_window, hidden_states, lm_logits
from .kernels import use_fast_linear
from .load import (
    DTYPES,
    ModelLoadError,
    architectures,
    check_model_object,
    check_vocab,
    from_folder,
    from_pretrained,
)


def is_sequence_classifier(path: str | Path) -> bool:
    return _has_architecture(path, "ForSequenceClassification")


def is_token_classifier(path: str | Path) -> bool:
    return _has_architecture(path, "ForTokenClassification")


ADAPTER_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS"}


def _has_architecture(path: str | Path, suffix: str) -> bool:
    """Whether the folder holds a ``...{suffix}`` model, or a LoRA adapter of one (its task type)."""
    from .lora import adapter_task, is_adapter_folder

    if is_adapter_folder(path):
        return adapter_task(path) == ADAPTER_TASKS.get(suffix)
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith(suffix) for a in archs)


def require_reward_model(path: str | Path, key: str = "reward_model") -> None:
    """Refuse a folder that is not a trained reward model: a causal LM would get a randomly
    initialised score head (transformers only notes it), and its scores would be noise."""
    from .lora import adapter_task, is_adapter_folder

    if isinstance(path, torch.nn.Module):  # Python API: a classifier object, taken as trained
        if not type(path).__name__.endswith("ForSequenceClassification"):
            raise ModelLoadError(f"{key}: a {type(path).__name__} object is not a reward model; it needs a "
                                 "...ForSequenceClassification model with a trained score head")
        return
    if is_adapter_folder(path) and adapter_task(path) == "SEQ_CLS":
        return  # a reward model's LoRA adapter (`rlhfkit rm lora.r=...`): its score head is in the adapter
    archs = architectures(path)
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelLoadError(f"{key}: {path} is not a reward model ({', '.join(archs) or 'no architecture named'}); "
                             "it needs a ...ForSequenceClassification folder with a trained score head "
                             "(`rlhfkit rm` writes one)")


@contextlib.contextmanager
def fresh_head_quietly(path):
    """transformers' load report (a table of the head's missing weights, "consider training on
    your downstream task") left out where the head is meant to start fresh: a causal-LM folder
    loaded as a classifier, which is what a reward model, critic or PRM trained here starts from;
    and where the head comes next, from a classifier's LoRA adapter folder."""
    from transformers.utils import logging as hf_logging

    from .lora import adapter_task, is_adapter_folder

    if is_adapter_folder(path):  # a classifier's adapter carries its head, loaded after the base
        quiet = adapter_task(path) in ADAPTER_TASKS.values()
    else:
        try:
            archs = architectures(path)
        except ModelLoadError:  # no model folder (a missing one): from_folder says what it is
            archs = ["?"]
        quiet = bool(archs) and not any(a.endswith(("ForSequenceClassification", "ForTokenClassification", "?"))
                                        for a in archs)
    if not quiet:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_reward_model(path: str | Path, tokenizer, dtype: str = "fp32", seed: int = 0, device: str = "cpu"):
    """A ``num_labels=1`` sequence classifier from ``path`` (a classifier folder or a causal LM).

    A classifier folder keeps its config's pad id, which says where its score is read
    (``score_index``), as in plain transformers; a causal-LM start takes the tokenizer's, so that
    the folder it is saved to reads where training read. A LoRA adapter reads as its base did."""
    from transformers import AutoModelForSequenceClassification

    from .lora import adapter_base, is_adapter_folder

    if isinstance(path, torch.nn.Module):  # Python API: a classifier object, trained in place
        check_model_object(path)
        model = path
    else:
        base = adapter_base(path) if is_adapter_folder(path) else path  # an adapter reads as its base did
        pad = {} if is_sequence_classifier(base) else {"pad_token_id": tokenizer.pad_token_id}
        with torch.random.fork_rng(), fresh_head_quietly(path):
            torch.manual_seed(seed)  # the fresh score head of a causal-LM start is seeded
            model = from_folder(AutoModelForSequenceClassification, path, num_labels=1, dtype=DTYPES[dtype], **pad)
    where = str(path) if isinstance(path, (str, Path)) else type(path).__name__
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{where}: a reward model needs num_labels=1, the model has {model.config.num_labels}")
    check_vocab(model, tokenizer, where)
    use_fast_linear(model)
    return model.to(device)


PRM_SETTINGS = ("step_separator", "step_readout", "step_logprob_floor")  # how a PRM reads steps
PRM_SETTINGS_FILE = "prm_settings.json"  # beside a LoRA adapter, which has no config.json to hold them


def prm_settings(path: str | Path) -> dict:
    """The PRM_SETTINGS a folder was saved with: in its config.json, or, for a LoRA adapter
    folder, in its PRM_SETTINGS_FILE (``prm_settings_file``, which methods/prm.py saves beside the
    adapter); {} for a PRM trained elsewhere."""
    for name in ("config.json", PRM_SETTINGS_FILE):
        file = Path(path) / name
        if file.is_file():
            saved = json.loads(file.read_text())
            return {k: saved[k] for k in PRM_SETTINGS if saved.get(k) is not None}
    return {}


def prm_settings_file(config) -> str:
    """``config``'s PRM_SETTINGS as the text of a PRM_SETTINGS_FILE, to be saved beside a LoRA
    adapter (a merged or full folder holds them in its config.json already)."""
    settings = {k: getattr(config, k) for k in PRM_SETTINGS if getattr(config, k, None) is not None}
    return json.dumps(settings, indent=2) + "\n"


def is_likelihood_prm(path: str | Path) -> bool:
    """A causal-LM folder (or its LoRA adapter) saved as a PRM with the likelihood read-out."""
    return prm_settings(path).get("step_readout") == "likelihood"


def load_process_reward_model(path: str | Path, tokenizer, num_labels: int = 1, dtype: str = "fp32", seed: int = 0,
                              device: str = "cpu", readout: str = "head"):
    """A ``...ForTokenClassification`` from ``path``: a PRM folder (its own number of labels) or a
    causal LM (a fresh head with ``num_labels`` outputs, seeded). The head's dropout is set to 0
    (transformers' default is 0.1), so a forward in plain transformers is the one trained here.
    With ``readout="likelihood"``, or a folder saved with it, the causal LM itself (no head)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    from .lora import adapter_base, is_adapter_folder, load_merged

    if not Path(path).is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    if readout == "likelihood" or is_likelihood_prm(path):
        if is_token_classifier(path):
            raise ModelLoadError(f"{path}: the likelihood read-out needs a causal LM, not a token classifier")
        model = from_folder(AutoModelForCausalLM, path, dtype=DTYPES[dtype], pad_token_id=tokenizer.pad_token_id)
        check_vocab(model, tokenizer, str(path))
        use_fast_linear(model)
        return _with_settings(model, path).to(device)
    adapter = is_adapter_folder(path)  # a PRM trained with LoRA: its base, the adapter and head merged in
    base = adapter_base(path) if adapter else path
    labels = {} if is_token_classifier(base) else {"num_labels": num_labels}
    config = AutoConfig.from_pretrained(str(base), pad_token_id=tokenizer.pad_token_id, **labels)
    config.classifier_dropout = 0.0
    with torch.random.fork_rng(), fresh_head_quietly(base):
        torch.manual_seed(seed)
        model = from_pretrained(AutoModelForTokenClassification, str(base), config=config, dtype=DTYPES[dtype])
    if adapter:
        model = load_merged(model, path)
    if model.config.num_labels not in (1, 2):
        raise ModelLoadError(f"{path}: a process reward model has 1 or 2 labels, the folder has {model.config.num_labels}")
    check_vocab(model, tokenizer, str(path))
    use_fast_linear(model)
    return _with_settings(model, path).to(device)


def _with_settings(model, path):
    """``model`` with the PRM_SETTINGS its folder was saved with on its config (an adapter's base
    config lacks them)."""
    for key, value in prm_settings(path).items():
        setattr(model.config, key, value)
    return model


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


def score_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where transformers' ``...ForSequenceClassification`` reads its score: the rightmost token
    that is not the config's pad id (transformers 5), among the attended ones, so that a batch
    padded with another id (the policy's, or a tokenizer whose pad is not the config's) reads where
    the sequence alone is read. (B,)

    With pad = eos (GPT-2's tokenizer, or any tokenizer whose pad falls back to eos) that is the
    token before the final EOS, not the EOS itself; reading there keeps a saved reward model's
    score the same in rlhfkit and in plain transformers. Without a pad id transformers reads the
    last position (one row only); here the last attended token, which is that for one row.
    """
    if pad_token_id is None:
        return last_token_index(attention_mask)
    return last_token_index(attention_mask.bool() & (input_ids != pad_token_id))


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  rows_per_forward: int = 0) -> torch.Tensor:
    """r(x, y): the score head read where transformers reads it (``score_index``), in forwards of
    at most ``rows_per_forward`` rows (0: one forward). (B,)"""
    if not 0 < rows_per_forward < len(input_ids):
        return as_forward(model, _reward_scores, input_ids, attention_mask)
    return torch.cat([as_forward(model, _reward_scores, input_ids[i], attention_mask[i])
                      for i in row_chunks(len(input_ids), rows_per_forward)])


def _reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    index = score_index(input_ids, attention_mask, model.config.get_text_config().pad_token_id)
    first = int(index.min()) if index.numel() else 0  # the columns before it are context only
    hidden = hidden_states(model, input_ids, attention_mask, first=first)  # (B, T - first, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index - first]  # (B, H)
    return score_head(model)(last).squeeze(-1).float()


def shared_prompt_scores(model, batch) -> torch.Tensor:
    """r(x, y) for every output of a ``SharedPromptBatch`` (data/prefs.py), in slot order. (N,)"""
    return as_forward(model, _shared_prompt_scores, batch.input_ids, batch.position_ids, batch.attend, batch.last)


def _shared_prompt_scores(model, input_ids, position_ids, attend, last) -> torch.Tensor:
    first, rows = flat_window(last, input_ids.shape[1])  # the columns before ``first`` are context only
    hidden = hidden_states(model, input_ids, attend, position_ids, first)  # (P, W - first, H)
    return score_head(model)(hidden.flatten(0, 1)[rows]).squeeze(-1).float()


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int = 0) -> torch.Tensor:
    """V(s_t) for every position from column ``first`` on: the score head on every hidden state
    (the PPO critic). (B, T - first)"""
    return as_forward(model, lambda m, ids, mask: score_head(m)(hidden_states(m, ids, mask, first=first))
                      .squeeze(-1).float(), input_ids, attention_mask)


STEP_READOUTS = ("head", "likelihood")


def step_readout(model) -> str:
    """How a PRM gives step scores (config ``step_readout``): ``head``, a score head read at the
    separator (a token classifier); ``likelihood``, its own next-token log-probabilities (a causal LM)."""
    return getattr(model.config, "step_readout", None) or "head"


def step_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_rows: torch.Tensor,
                step_cols: torch.Tensor, step_spans: torch.Tensor | None = None) -> torch.Tensor:
    """The PRM's logit that each step is right. (N,)

    ``head``: the score head read at (step_rows, step_cols). ``likelihood``: the lowest log p the
    model gives a token of the step (the tokens of ``step_spans``, (N, 2) [start, end)) above the
    config's ``step_logprob_floor``: a step is judged wrong once one of its tokens is one the
    model did not expect, which is where a causal LM already holds the check (issue #14)."""
    if step_readout(model) == "likelihood":
        return as_forward(model, _likelihood_step_logits, input_ids, attention_mask, step_rows, step_spans)
    return as_forward(model, _step_logits, input_ids, attention_mask, step_rows, step_cols)


def _step_logits(model, input_ids, attention_mask, step_rows, step_cols) -> torch.Tensor:
    hidden = hidden_states(model, input_ids, attention_mask)[step_rows, step_cols]  # (N, H)
    return step_logit(score_head(model)(hidden).float())


def _likelihood_step_logits(model, input_ids, attention_mask, step_rows, step_spans) -> torch.Tensor:
    hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]  # (B, T-1): position t-1 predicts token t
    logprobs = torch.log_softmax(lm_logits(model, hidden).float(), -1)
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    tokens = torch.arange(1, input_ids.shape[1], device=input_ids.device)  # the token each column scores
    inside = (tokens >= step_spans[:, :1]) & (tokens < step_spans[:, 1:])  # (N, T-1)
    lowest = token_logprobs[step_rows].masked_fill(~inside, float("inf")).amin(-1)  # (N,)
    return lowest - float(model.config.step_logprob_floor)
