"""Load any Hugging Face causal-LM folder (and its tokenizer), save so plain transformers loads it."""

from __future__ import annotations

from pathlib import Path

import torch

from .kernels import use_fast_linear

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(ValueError):
    pass


def load_tokenizer(model_path: str | Path, tokenizer_path: str | Path | None = None):
    """The tokenizer from ``tokenizer_path``, else from the model folder; pad falls back to eos."""
    from transformers import AutoTokenizer

    if not str(tokenizer_path or model_path).strip():
        raise ModelLoadError("no model folder given (the model path is empty)")
    source = Path(tokenizer_path or model_path)
    if not source.is_dir():
        raise ModelLoadError(f"folder not found: {source}")
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        hint = "" if tokenizer_path else " (a model folder without a tokenizer: pass tokenizer=PATH)"
        raise ModelLoadError(f"no tokenizer files in {source}{hint}")
    try:
        if _declares_plain_fast_tokenizer(source):
            # Load exactly the tokenizer.json the folder ships: AutoTokenizer would let some
            # model types (qwen2) substitute their own tokenizer class and pipeline.
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # tokenizers raises its own Exception on a broken tokenizer.json
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"cannot load a tokenizer from {source}: {type(e).__name__}: {first}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer at {source} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _declares_plain_fast_tokenizer(folder: Path) -> bool:
    import json

    config = folder / "tokenizer_config.json"
    if not (config.is_file() and (folder / "tokenizer.json").is_file()):
        return False
    declared = json.loads(config.read_text()).get("tokenizer_class")
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def check_vocab(model, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
            f"only {rows} rows; ids >= {rows} would index out of range"
        )


def architectures(path: str | Path) -> list[str]:
    """The ``architectures`` a model folder's config.json names; a one-line ModelLoadError when the
    folder is not a model folder (missing, no config.json, a config that does not parse)."""
    import json

    folder = Path(path)
    if not str(path).strip():
        raise ModelLoadError("no model folder given (the model path is empty)")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        values = json.loads(config.read_text())
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{config}: not a readable model config ({e})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ModelLoadError(f"{config}: not a model config (no 'model_type')")
    return list(values.get("architectures") or [])


def from_pretrained(auto_class, path: str | Path, **kwargs):
    """``auto_class.from_pretrained`` with a one-line ModelLoadError for a folder that does not
    load (truncated weights, a config transformers refuses)."""
    try:
        return auto_class.from_pretrained(str(path), **kwargs)
    except Exception as e:  # safetensors, json, OSError and ValueError all occur here
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {first}") from None


def load_causal_lm(path: str | Path, tokenizer=None, dtype: str = "fp32", device: str = "cpu"):
    """A causal LM from an HF folder, in ``dtype`` on ``device``; checks the tokenizer fits when given.
    A reward-model folder (``...ForSequenceClassification``) is refused by name."""
    from transformers import AutoModelForCausalLM

    heads = [a for a in architectures(path) if a.endswith(("ForSequenceClassification", "ForTokenClassification"))]
    if heads:
        raise ModelLoadError(f"{path} is a reward or value model ({heads[0]}), not a causal LM; a policy needs a "
                             "...ForCausalLM folder (the SFT model)")
    model = from_pretrained(AutoModelForCausalLM, path, dtype=DTYPES[dtype])
    if tokenizer is not None:
        check_vocab(model, tokenizer, str(path))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    use_fast_linear(model)  # CPU fp32 only; elsewhere the layers run F.linear unchanged
    return model.to(device)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole state dict. On an FSDP2-sharded model it is all-gathered: every rank must call it."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named FSDP<Class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_model(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors) plus the tokenizer, so the folder stands on its own.

    ``state_dict``: the full weights of a sharded model (``full_state_dict``), written through a
    fresh, unsharded instance of the model's own class so that the folder names that class."""
    if state_dict is not None:
        with torch.device("meta"):
            plain = unsharded_class(model)._from_config(model.config)
        plain.load_state_dict(state_dict, assign=True, strict=False)
        plain.tie_weights()
        model = plain
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
