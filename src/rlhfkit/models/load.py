"""Load any Hugging Face causal-LM folder (and its tokenizer), save so plain transformers loads it."""

from __future__ import annotations

import copy as _copy
from pathlib import Path

import torch

from .forward import head_gap
from .kernels import use_fast_linear
from .tokenizer import save_tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(ValueError):
    pass


def hub_hint(path) -> str:
    """For a missing folder named like a Hub id (``org/name``, no ``org`` folder here): that models
    load from folders."""
    text = str(path)
    if Path(text).name == "snapshot" and (Path(text).parent / "model").is_dir():  # a shipped config after a short SFT
        return (f" (SFT writes its snapshot when held-out accuracy first reaches snapshot_at_accuracy, and this run "
                f"never did; start from its final model: model={Path(text).parent / 'model'})")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text.split("/")[0]).exists():
        return (f" (if {text} is a Hub id: rlhfkit loads a model from a local folder; download it first, e.g. "
                f"huggingface-cli download {text} --local-dir DIR, and pass DIR)")
    return ""


def load_tokenizer(model_path, tokenizer_path=None):
    """The tokenizer from ``tokenizer_path``, else from the model folder; pad falls back to eos.

    Python callers may pass a tokenizer object as ``tokenizer_path`` (it is used as it is); a
    model object as ``model_path`` needs one, since a model object carries no tokenizer."""
    if tokenizer_path is not None and not isinstance(tokenizer_path, (str, Path)):
        return _checked(tokenizer_path, type(tokenizer_path).__name__)
    if tokenizer_path is None and isinstance(model_path, torch.nn.Module):
        raise ModelLoadError("a model object was given without a tokenizer: pass tokenizer= (an object or a folder)")
    from transformers import AutoTokenizer

    if not str(tokenizer_path or model_path).strip():
        raise ModelLoadError("no model folder given (the model path is empty)")
    source = Path(tokenizer_path or model_path)
    if not source.is_dir():
        raise ModelLoadError(f"folder not found: {source}{hub_hint(source)}")
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        hint = "" if tokenizer_path else (" (a model folder without a tokenizer: pass tokenizer=PATH, "
                                          "or --tokenizer PATH to rlhfkit eval)")
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
    return _checked(tokenizer, str(source))


def _checked(tokenizer, where: str):
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer at {where} has no eos token")
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


def check_shared_tokenizer(folder, tokenizer, role: str, trained: str, say=None) -> None:
    """A second model that must read ``tokenizer``'s ids (PPO's reward model and critic, a
    distillation teacher): its folder's own tokenizer, where it has one, must have the same
    vocabulary, token for token; a folder without one is said (``say``) and given the ids as they are."""
    if not isinstance(folder, (str, Path)):  # a model object (Python API): nothing to read
        return
    if not Path(folder).is_dir():  # said as the loader says it, not as a folder without tokenizer files
        return
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        if say is not None:
            say(f"warning: the {role} at {folder} has no tokenizer files, so whether it reads the {trained}'s "
                "token ids cannot be checked; it is given them")
        return
    theirs = load_tokenizer(folder)  # a broken one is an error, not a check skipped
    if theirs.get_vocab() != tokenizer.get_vocab():
        differ = sorted(set(theirs.get_vocab().items()) ^ set(tokenizer.get_vocab().items()))[:3]
        raise ModelLoadError(f"the {role} at {folder} uses another tokenizer than the {trained} (e.g. {differ}); "
                             "the same id would be another token to each model")


def check_head(model, where: str) -> None:
    """Refuse a causal LM whose logits rlhfkit's forwards would not reproduce (models/forward.py):
    a gap above 1e-3 of the largest logit, or with a 16-bit head two of its rounding steps (bf16:
    1.6e-2; its logits round to 2^-8 of their size). Gemma-2's soft-cap, Granite's or Cohere's
    scaling leave far larger gaps (tested in bf16 too); a final step that moved the logits by less
    than 1.6% would pass a bf16 load unseen, and is caught by an fp32 load of the same folder."""
    gap = head_gap(model)
    tolerance = max(1e-3, 2 * torch.finfo(model.get_output_embeddings().weight.dtype).eps)
    if not gap <= tolerance:
        raise ModelLoadError(f"{where}: rlhfkit's logits differ from the model's own forward by {gap:.3g} "
                             f"({type(model).__name__} applies a final step that models/forward.py "
                             "LOGIT_PROCESSING does not know)")


def stored_dtype(path) -> str | None:
    """The dtype a model folder's config.json says its weights are stored in (``dtype``, or
    transformers 4's ``torch_dtype``); None for anything else (an object, an adapter folder)."""
    import json

    config = Path(path) / "config.json" if isinstance(path, (str, Path)) else None
    if config is None or not config.is_file():
        return None
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return values.get("dtype") or values.get("torch_dtype")


def architectures(path: str | Path) -> list[str]:
    """The ``architectures`` a model folder's config.json names; a one-line ModelLoadError when the
    folder is not a model folder (missing, no config.json, a config that does not parse)."""
    import json

    folder = Path(path)
    if not str(path).strip():
        raise ModelLoadError("no model folder given (the model path is empty)")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {path}{hub_hint(path)}")
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


# State-space and RNN language models: RWKV reads no attention mask (a left-padded row's log-probs
# come out wrong) and keeps a state, not a KV cache; Mamba's cache cannot be repeated per sample.
RECURRENT = ("rwkv", "mamba", "mamba2", "falcon_mamba", "xlstm", "recurrent_gemma")


def load_causal_lm(path, tokenizer=None, dtype: str = "fp32", device: str = "cpu", copy: bool = False):
    """A causal LM from an HF folder (a LoRA adapter folder loads its base with the adapter
    merged in), in ``dtype`` on ``device``; checks the tokenizer fits when given. A reward-model
    folder (``...ForSequenceClassification``) is refused by name.

    ``path`` may also be a model object (Python API): it is used as it is, or deep-copied with
    ``copy=True`` (a frozen reference made from the same object)."""
    from transformers import AutoModelForCausalLM

    if isinstance(path, torch.nn.Module):
        check_model_object(path)
        model = (_copy.deepcopy(path) if copy else path).to(DTYPES[dtype])
    else:
        model = from_folder(AutoModelForCausalLM, path, dtype=DTYPES[dtype])
    where = str(path) if isinstance(path, (str, Path)) else type(path).__name__
    if getattr(model.config, "model_type", None) in RECURRENT:
        raise ModelLoadError(f"{where} is a recurrent model ({model.config.model_type}); rlhfkit trains attention "
                             "decoders: its padded batches and KV-cache sampling do not apply to a recurrent state")
    if tokenizer is not None:
        check_vocab(model, tokenizer, where)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if getattr(model.config, "pad_token_id", None) is None:  # a tokenizer padded with its EOS (as TRL pads):
            model.config.pad_token_id = tokenizer.pad_token_id  # the saved config.json says so, as generation's does
    check_head(model, where)
    use_fast_linear(model)  # CPU fp32 only; elsewhere the layers run F.linear unchanged
    return model.to(device)


def check_model_object(model: torch.nn.Module) -> None:
    """A model object (Python API) rlhfkit can train in place: not peft's ``PeftModel`` wrapper, and
    not one holding the adapters of an earlier LoRA run (a second run would start its adapters
    afresh over them, or a full fine-tune train them alone, with no word of it)."""
    from .lora import has_adapters

    if type(model).__name__.startswith("PeftModel"):
        raise ModelLoadError(f"a {type(model).__name__} object: rlhfkit adds LoRA itself; pass the base model with "
                             "lora.r (and lora.target_modules), or model.merge_and_unload().requires_grad_(True) to train the "
                             "merged weights")
    if has_adapters(model):
        raise ModelLoadError("the model object holds the LoRA adapters of an earlier run; start from the folder that "
                             "run saved (model=<out>/model: its adapter is merged in), or pass a fresh object")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of ``model`` set to 0 (``nn.Dropout`` modules and the attention's own rate), in
    place, the saved config untouched; so is the noise a mixture of experts' router multiplies its
    input by in training (Mixtral's ``jitter_noise``, ``TRAINING_NOISE``). The RL trainers take
    pi_old with the model in eval mode and pi_theta in train mode: at the same weights they must
    be one distribution (the first ratio 1), as TRL's PPO makes them."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():  # rates a forward reads as numbers (OPT's dropout, layerdrop)
            if isinstance(value, float) and ("dropout" in name or "pdrop" in name or name in TRAINING_NOISE):
                setattr(module, name, 0.0)
    return model


# Rates read in training only (PhiMoE's ``router_jitter_noise`` is not one: its routing reads it
# in eval mode too, as a threshold)
TRAINING_NOISE = ("layerdrop", "jitter_noise", "input_jitter_noise", "moe_jitter_eps")


def from_folder(auto_class, path, **kwargs):
    """``auto_class`` from a model folder, with one-line errors; a LoRA adapter folder loads its
    base with the adapter merged in. A reward or value model given as a causal LM is refused."""
    from .lora import adapter_base, is_adapter_folder, load_merged

    if is_adapter_folder(path):
        try:
            base = adapter_base(path)
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
        return load_merged(from_folder(auto_class, base, **kwargs), path)
    archs = architectures(path)
    heads = [a for a in archs if a.endswith(("ForSequenceClassification", "ForTokenClassification"))]
    if heads and auto_class.__name__ == "AutoModelForCausalLM":
        raise ModelLoadError(f"{path} is a reward or value model ({heads[0]}), not a causal LM; a policy needs a "
                             "...ForCausalLM folder (the SFT model)")
    return from_pretrained(auto_class, path, **kwargs)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole state dict. On an FSDP2-sharded model it is all-gathered: every rank must call it."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(model: torch.nn.Module) -> tuple[int, str, bool] | None:
    """(the positions the model's config says it covers, the field that says so, whether they are
    a learned table with no row past them, as GPT-2's ``wpe``), or None where the config names
    none. Rotary and ALiBi models have no table: past the limit they extrapolate."""
    config = getattr(model, "config", None)
    written = config.to_dict() if hasattr(config, "to_dict") else {}  # GPT-2's n_positions, not its alias
    found = next(((written[f], f) for f in POSITION_FIELDS if isinstance(written.get(f), int) and written[f] > 0), None)
    if found is None:
        return None
    tables = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
              and ("position" in name.rsplit(".", 1)[-1] or name.rsplit(".", 1)[-1] == "wpe")]
    # RoBERTa's table starts after its padding row: 514 rows hold 512 positions
    rows = [t.num_embeddings - (t.padding_idx + 1 if t.padding_idx is not None else 0) for t in tables]
    return min([found[0], *rows]), found[1], bool(tables)


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named FSDP<Class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_model(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None, merge: bool = False) -> None:
    """``save_pretrained`` (safetensors) plus the tokenizer, so the folder stands on its own.

    ``state_dict``: the full weights of a sharded model (``full_state_dict``), written through a
    fresh, unsharded instance of the model's own class so that the folder names that class.
    A model with LoRA adapters (models/lora.py) is saved as an adapter folder that
    ``PeftModel.from_pretrained`` loads; with ``merge`` the folder holds the merged model instead,
    and the adapter goes to ``out_dir/adapter``."""
    from .lora import has_adapters, merged_state

    out_dir = Path(out_dir)
    if has_adapters(model):
        state = state_dict if state_dict is not None else model.state_dict()
        _save_adapter(model, tokenizer, out_dir / "adapter" if merge else out_dir, state)
        if not merge:
            return
        state_dict = merged_state(model, state)
    if state_dict is not None:
        with torch.device("meta"):
            plain = unsharded_class(model)._from_config(model.config)
        plain.load_state_dict(state_dict, assign=True, strict=False)
        plain.tie_weights()
        if getattr(model, "generation_config", None) is not None:  # causal LMs have one, classifiers not
            plain.generation_config = model.generation_config
        model = plain
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)


def _save_adapter(model, tokenizer, out_dir: Path, state: dict) -> None:
    import json

    from safetensors.torch import save_file

    from .lora import ADAPTER_CONFIG, adapter_config, adapter_state, stacked_on_start

    config, tensors = adapter_config(model), adapter_state(model, state)
    config, tensors = stacked_on_start(config, tensors) or (config, tensors)  # a LoRA stage after a LoRA stage
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
