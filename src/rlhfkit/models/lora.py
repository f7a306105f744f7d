"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) through ``peft``, and activation checkpointing.

A LoRA layer computes ``h = W0 x + (alpha / r) B A x`` with ``A`` (r, in) and ``B`` (out, r):
``W0`` stays frozen and ``B`` starts at zero, so the adapted model starts equal to its base.
rlhfkit injects peft's LoRA layers into the Hugging Face model itself
(``peft.inject_adapter_in_model``) instead of wrapping it in a ``PeftModel``: every forward, the
FSDP2 sharding and the checkpoints see the model's own module tree, only with adapters in it.

- ``apply_lora``: inject adapters, freeze everything else except a scalar head (the reward
  model's or the critic's ``score``), which is trained in full.
- ``adapter_disabled`` / ``Reference``: the base model's outputs, so that a method's frozen
  reference needs no second copy of the weights.
- ``adapter_state`` / ``merged_state``: the two folders a LoRA run saves (models/load.py
  ``save_model``): the adapter, keyed as ``PeftModel.save_pretrained`` keys it, and the merged
  weights ``W0 + (alpha / r) B A`` under the un-adapted model's own names.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER = "default"  # peft's name for the one adapter rlhfkit trains
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the model's own names


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: str  # "all-linear" (every linear layer but the output head) or "q_proj,v_proj,..."


def has_adapters(model: torch.nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None and ADAPTER in model.peft_config


def apply_lora(model: torch.nn.Module, settings: LoraSettings, base: str | None, head: str | None = None):
    """Inject LoRA adapters into ``model`` in place and freeze all but them (and ``head``, trained in full).

    ``base``: the folder the model came from, written into the adapter's config so that
    ``PeftModel.from_pretrained`` and rlhfkit's loaders find it again."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = settings.target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, exclude_modules=[head] if head else None,
                        task_type=_task_type(model, head), base_model_name_or_path=base)
    model.requires_grad_(False)
    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. target modules that match nothing
        raise ValueError(f"lora.target_modules={settings.target_modules!r}: {e}") from None
    if head:  # trained in full, as a plain module; saved beside the adapter as peft's modules_to_save
        getattr(model, head).requires_grad_(True)
        model.peft_config[ADAPTER].modules_to_save = [head]
    return model


def unmergeable(model) -> str | None:
    """Why the adapters of ``model`` cannot be merged into a plain model (None: they can).

    - An adapter on the input or output embedding of a model whose two are tied: merged, its
      update would have to go into the one tensor both share (``save_pretrained`` keeps one),
      changing the other too, or be lost.
    - An adapter on a parameter rather than a layer (peft's ``target_parameters``, which its
      ``all-linear`` picks for experts stored as one 3-D tensor, as Mixtral's and Qwen3-MoE's
      are): ``merged_state`` folds in ``B @ A`` of linear layers and embeddings only."""
    from peft.tuners.lora import layer as lora_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapper = getattr(lora_layers, "ParamWrapper", None)  # peft >= 0.17 (before it, no parameter is adapted)

    output = model.get_output_embeddings()  # None in a classifier (RM, PRM, critic): nothing shares the embeddings
    if getattr(model.config, "tie_word_embeddings", False) and output is not None and any(
            isinstance(m, BaseTunerLayer) for m in (model.get_input_embeddings(), output)):
        return "they adapt the embeddings, which this model ties to its output layer, and a merged model cannot " \
               "hold the two apart"
    wrapped = sorted({name.split(".base_layer")[0] for name, m in model.named_modules()
                      if isinstance(m, wrapper)}) if wrapper is not None else []
    if wrapped:
        return f"they adapt parameters, not layers ({wrapped[0]}{' and others' if len(wrapped) > 1 else ''}: " \
               "experts stored as one tensor), which rlhfkit does not merge"
    return None


def _task_type(model, head: str | None) -> str:
    """peft's name for what the model is (PeftModel.from_pretrained picks its wrapper by it)."""
    if not head:
        return "CAUSAL_LM"
    return "TOKEN_CLS" if type(model).__name__.endswith("ForTokenClassification") else "SEQ_CLS"


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (non-reentrant checkpointing: the same gradients, less memory, one more forward)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def _adapter_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module):
    """``model`` computing its base model's outputs: every adapter switched off, then back on."""
    layers = _adapter_layers(model)
    trainable = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    for layer in layers:
        layer.enable_adapters(False)
    for p in trainable:  # peft froze them too: FSDP2 takes a group's gradient dtypes from its trainable parameters
        p.requires_grad_(True)  # at its first forward, and with none it reduced bf16 gradients into fp32 ones
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class Reference:
    """The frozen reference a method reads log-probs from: a module of its own, or (LoRA) the
    trained model with its adapters switched off, which is the start model without a copy.

    ``with reference() as model: ...``"""

    def __init__(self, module: torch.nn.Module | None = None, adapted: torch.nn.Module | None = None):
        self.module, self.adapted = module, adapted

    @contextlib.contextmanager
    def __call__(self):
        if self.module is not None:
            yield self.module
            return
        model = self.adapted
        was_training = model.training
        model.eval()  # no adapter dropout, as a frozen copy would be
        try:
            with adapter_disabled(model):
                yield model
        finally:
            model.train(was_training)


def adapter_state(model: torch.nn.Module, state: dict) -> dict:
    """The adapter's tensors (and a fully trained head's), keyed as ``PeftModel.save_pretrained`` keys them."""
    from peft import get_peft_model_state_dict

    out = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER).items()}
    for head in model.peft_config[ADAPTER].modules_to_save or ():
        out.update({PEFT_PREFIX + k: v for k, v in state.items() if k.startswith(head + ".")})
    seen, kept = set(), {}
    for k, v in out.items():  # a tied model's embedding and output layer, both adapted: peft saves each base weight
        v = v.detach().contiguous()  # (save_embedding_layers), and safetensors refuses tensors that share memory
        kept[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return kept


def adapter_config(model: torch.nn.Module) -> dict:
    config = model.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def merged_state(model: torch.nn.Module, state: dict) -> dict:
    """The full weights with every adapter folded in, ``W = W0 + scaling * B @ A``, under the
    names of the model without adapters (``q_proj.base_layer.weight`` -> ``q_proj.weight``). A
    layer stored (in, out), as GPT-2's Conv1D (peft's ``fan_in_fan_out``), and an embedding
    (peft's ``lora_embedding_A`` (r, vocab) and ``_B`` (dim, r)) take ``(B @ A)^T``."""
    out = {}
    for name, value in state.items():
        if ".lora_" in name:  # lora_A/_B (linear layers), lora_embedding_A/_B: folded in below
            continue
        if ".base_layer." not in name:
            out[name] = value
            continue
        owner, param = name.split(".base_layer.")
        if param == "weight":
            layer = model.get_submodule(owner)
            embedding = f"{owner}.lora_embedding_A.{ADAPTER}" in state
            if embedding:
                a, b = state[f"{owner}.lora_embedding_A.{ADAPTER}"], state[f"{owner}.lora_embedding_B.{ADAPTER}"]
            else:
                a, b = state[f"{owner}.lora_A.{ADAPTER}.weight"], state[f"{owner}.lora_B.{ADAPTER}.weight"]
            delta = b.float() @ a.float()  # (out, in); an embedding's (dim, vocab)
            if embedding or getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            value = value + layer.scaling[ADAPTER] * delta.to(value.dtype)
        out[f"{owner}.{param}"] = value
    return out


def stacked_on_start(config: dict, tensors: dict) -> tuple[dict, dict] | None:
    """An adapter trained on a model that was itself an adapter folder merged into its base (a LoRA
    stage after a LoRA stage), rewritten onto that plain base: one adapter of rank r1 + r2 whose
    update is both, ``[B1 s1, B2 s2] @ [A1; A2] = s1 B1 A1 + s2 B2 A2``, scaling 1, on the union of
    the two's layers (zero blocks where one has none). ``PeftModel.from_pretrained`` then loads it
    onto a plain folder; the adapter as trained names the start adapter folder as its base, which
    transformers loads as a second adapter of the same name (wrong outputs, no error). None where
    the base is no adapter folder; an earlier chain is stacked first, so any depth ends on a plain
    base. Modules the start adapter trained in full (``modules_to_save``) come along where the new
    stage did not train them again. A start adapter that sets per-layer ranks or alphas, trained
    biases or tokens, or another kind of update (DoRA), is refused: those are not read here."""
    start = config.get("base_model_name_or_path")
    if not is_adapter_folder(start):
        return None
    first_config, first = start_adapter(start)

    def scaling(cfg: dict, r: int) -> float:
        return cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)

    def pairs(weights: dict) -> dict:  # layer -> (A, B, a-key suffix, b-key suffix) of one adapter
        out = {}
        for key, a in weights.items():
            for a_part, b_part in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
                if key.endswith(a_part):
                    layer = key[: -len(a_part)]
                    out[layer] = (a, weights[layer + b_part], a_part, b_part)
        return out

    old, new = pairs(first), pairs(tensors)
    r1, r2 = first_config["r"], config["r"]
    s1, s2 = scaling(first_config, r1), scaling(config, r2)
    # modules trained in full (modules_to_save: a score head, an lm_head): the new stage's, and the start's it
    # did not train again (merged into the model it trained on, so unchanged)
    out = {k: v for k, v in {**first, **tensors}.items() if ".lora_" not in k}
    for layer in sorted(set(old) | set(new)):
        a_any, b_any, a_part, b_part = new.get(layer) or old[layer]
        blocks = []
        for got, r, s in ((old.get(layer), r1, s1), (new.get(layer), r2, s2)):
            a = got[0] if got else a_any.new_zeros((r, a_any.shape[1]))  # a layer one adapter leaves alone
            b = got[1] if got else b_any.new_zeros((b_any.shape[0], r))
            blocks.append((a.float(), b.float() * s))
        out[layer + a_part] = torch.cat([blocks[0][0], blocks[1][0]], 0).to(a_any.dtype)
        out[layer + b_part] = torch.cat([blocks[0][1], blocks[1][1]], 1).to(b_any.dtype)
    saved = sorted(set(first_config.get("modules_to_save") or ()) | set(config.get("modules_to_save") or ()))
    stacked = {**config, "r": r1 + r2, "lora_alpha": r1 + r2, "use_rslora": False, "modules_to_save": saved or None,
               "target_modules": sorted(layer.removeprefix(PEFT_PREFIX) for layer in set(old) | set(new)),
               "base_model_name_or_path": first_config["base_model_name_or_path"]}
    return stacked, out


def start_adapter(path) -> tuple[dict, dict]:
    """The config and tensors of the adapter folder ``path`` as one adapter on a plain base (a
    chain stacked, ``stacked_on_start``); a ValueError for one whose update is not read here, said
    before a LoRA stage on it trains (``Run.prepare``) rather than when it saves."""
    from safetensors.torch import load_file

    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    unread = [k for k in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "trainable_token_indices",
                          "target_parameters") if config.get(k)]
    if config.get("bias", "none") != "none":
        unread.append(f"bias={config['bias']}")
    if unread or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: the start adapter sets {', '.join(unread) or config.get('peft_type')}, so a LoRA "
                         "stage on it cannot be saved onto its plain base; merge it into a plain folder first (or "
                         "set lora.r=0)")
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    return stacked_on_start(config, tensors) or (config, tensors)


def is_adapter_folder(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_task(path) -> str | None:
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("task_type")


def adapter_base(path) -> str:
    """The base model folder an adapter folder names."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{path}: the adapter's base model folder {base!r} is not there")
    return base


def load_merged(model: torch.nn.Module, path) -> torch.nn.Module:
    """``model`` (the base) with the adapter folder ``path`` loaded and merged: a plain model, every
    weight trainable as a freshly loaded one's (peft freezes the base's, and merging keeps that: a
    later stage that started from an adapter folder had nothing to train). An adapter on the
    embeddings of a model that ties them to its output layer (``unmergeable``'s first reason) is
    merged into an untied model: merged into the one shared tensor, its update changed the other
    layer too, and every later stage, ``rlhfkit eval`` and a stacked adapter read another model
    than the one trained."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        adapted = PeftModel.from_pretrained(model, str(path))
        if getattr(model.config, "tie_word_embeddings", False) and unmergeable(adapted.get_base_model()):
            untie(adapted.get_base_model())
        return adapted.merge_and_unload().requires_grad_(True)


def untie(model: torch.nn.Module) -> None:
    """Give the output layer a weight of its own, equal to the input embedding it shared, and say
    in the config that the two are apart (its saved folders then hold both)."""
    layers = [getattr(m, "base_layer", m) for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    if layers[0].weight is layers[1].weight:
        layers[1].weight = torch.nn.Parameter(layers[0].weight.detach().clone(),
                                              requires_grad=layers[1].weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
