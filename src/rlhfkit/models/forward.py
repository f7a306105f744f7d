"""Forward passes that every method shares: per-token log-probs of given tokens.

Conventions: ``logprobs[:, t] = log pi(input_ids[:, t] | input_ids[:, <t])`` so a token mask
applies to log-probs unshifted; position 0 has no prediction and gets 0. Position ids always
come from the attention mask, so left- and right-padded rows give the same numbers.

These functions call the backbone and the head themselves (to skip logits nobody reads) and then
apply the model's own final processing of the logits (``lm_logits``: Gemma-2's soft-capping,
Granite's and Cohere's scaling), so the numbers are the model's own forward's; ``head_gap``
measures it once per loaded model and load.py refuses an architecture whose head does more.
Each runs through ``as_forward``: on a model sharded with FSDP2 the root module's own parameters
(embeddings, final norm, head) are gathered only around a registered forward method, and
``as_forward`` is that method (train/shard.py registers it); on any other model it is a call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import fused

ENTRY = "rlhfkit_forward"


def reshard(model: torch.nn.Module) -> torch.nn.Module:
    """Put a sharded model's parameters back as their shards: FSDP2 keeps the root's gathered after
    a forward with no backward (the backward frees them), so that its ``named_parameters`` are then
    whole tensors on some modules and shards on others, and an optimizer built then, or a sharded
    state dict taken then, reads the wrong tensors. No-op unsharded (or without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return model
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


@contextlib.contextmanager
def eval_mode(model, reshard_after: bool = True):
    """``model`` in eval mode, without gradients, restored to its training flag afterwards, and
    under FSDP2 its parameters back as shards (``reshard``). ``reshard_after=False``: a forward
    inside a training step, whose loss forward follows (its backward reshards)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        if reshard_after:
            reshard(model)


def install_entry(model) -> None:
    """Give ``model`` the method ``as_forward`` calls (FSDP2 then registers it as a forward)."""
    def entry(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)

    setattr(model, ENTRY, types.MethodType(entry, model))


def as_forward(model, fn, *args, **kwargs):
    """``fn(model, *args)`` as the model's forward (see the module docstring)."""
    entry = getattr(model, ENTRY, None)
    return entry(fn, *args, **kwargs) if entry is not None else fn(model, *args, **kwargs)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
    """The backbone's last hidden states at columns ``first``.. (B, T - first, H), without
    computing any vocabulary logits. ``attention_mask``: (B, T) padding, or a (B, 1, T, T) boolean
    mask of what each query attends to (with its ``position_ids``), which only the SDPA attention
    reads as such. The columns before ``first`` are still read as context; where the lean forward
    applies, the last layer does no other work for them."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    if fused.applies(model):
        return fused.backbone(model, input_ids, attention_mask, position_ids, first)
    backbone = getattr(model, model.base_model_prefix)
    balance = getattr(model, ROUTER_BALANCE, None)
    routed = {"output_router_logits": True} if balance is not None else {}
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   **routed)
    if balance is not None:
        function, experts, top_k, _ = balance.spec
        balance.losses.append(function(out.router_logits, experts, top_k, real_tokens(attention_mask)))
    return out.last_hidden_state[:, first:]


def real_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T): 1 at the real tokens of a padding mask, or of a (B, 1, T, T) block mask, where a padding
    position attends to itself only and nothing attends to it (data/prefs.py, data/encode.py)."""
    if attention_mask.dim() == 2:
        return attention_mask
    others = attention_mask[:, 0] & ~torch.eye(attention_mask.shape[-1], dtype=torch.bool,
                                                device=attention_mask.device)
    return (others.any(-1) | others.any(-2)).long()


ROUTER_BALANCE = "rlhfkit_router_balance"


@functools.lru_cache(maxsize=None)
def _balancing_function(model_class: type):
    """The load-balancing loss of a mixture of experts' modeling file, where it has transformers'
    usual one, ``load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask)``; the
    file of the first class up the hierarchy that has one (FSDP2 makes a subclass elsewhere)."""
    import inspect
    import sys

    for cls in model_class.__mro__:
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if function is not None:
            names = list(inspect.signature(function).parameters)
            return function if names == ["gate_logits", "num_experts", "top_k", "attention_mask"] else None
    return None


def balancing_loss(model):
    """A mixture of experts' router load-balancing loss as its own forward computes it (the
    Switch Transformer's, Fedus et al. 2021, eqs. 4-6, with every layer's tokens pooled into one
    fraction routed and one mean probability per expert): ``(function, num_experts, top_k, its
    config's router_aux_loss_coef)``, or None for a model without one of that form."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper
    function = _balancing_function(type(inner))
    experts, top_k = getattr(inner, "num_experts", None), getattr(inner, "num_experts_per_tok", None)
    if function is None or not isinstance(experts, int) or not isinstance(top_k, int):
        return None
    coef = getattr(inner.config.get_text_config(), "router_aux_loss_coef", 0.0)
    return function, experts, top_k, float(coef or 0.0)


@dataclasses.dataclass
class RouterBalance:
    """The balancing losses of the forwards made inside ``router_balance``."""

    coef: float
    spec: tuple | None = None  # ``balancing_loss(model)``, resolved once for the forwards inside
    losses: list = dataclasses.field(default_factory=list)

    def mean(self) -> torch.Tensor | None:
        """The forwards' mean balancing loss; None where none was made."""
        return torch.stack([value.float() for value in self.losses]).mean() if self.losses else None

    def add_to(self, loss: torch.Tensor, metrics: dict, share: float) -> torch.Tensor:
        """``loss`` + coef x ``mean()`` x ``share``: 1 / the step's forwards over all ranks, so that
        the step adds the coefficient times the mean over its forwards, as TRL's gradient
        accumulation and data parallelism average it; that part is logged as ``router_aux_loss``."""
        aux = self.mean()
        if aux is None:
            return loss
        metrics["router_aux_loss"] = (aux * share).detach()
        return loss + self.coef * aux * share


@contextlib.contextmanager
def router_balance(model, coef: float):
    """Inside, every backbone forward of ``model`` also returns its router logits and adds its
    balancing loss to the yielded ``RouterBalance`` (with ``coef`` 0, or a model without one, nothing)."""
    balance = RouterBalance(coef, balancing_loss(model) if coef else None)
    if balance.spec is None:
        yield balance
        return
    setattr(model, ROUTER_BALANCE, balance)
    try:
        yield balance
    finally:
        delattr(model, ROUTER_BALANCE)


def flat_window(index: torch.Tensor, width: int) -> tuple[int, torch.Tensor]:
    """For flat positions ``index`` into a (R, width) grid: the first column any of them is in, and
    the same positions in the (R, width - first) grid of the columns from it on."""
    first = int((index % width).min()) if index.numel() else 0
    return first, index // width * (width - first) + index % width - first


def first_column(wanted: torch.Tensor) -> int:
    """The first column of a (B, T) boolean grid where any row is set (0 if none is)."""
    columns = wanted.any(0).nonzero()
    return int(columns[0]) if columns.numel() else 0


# The final processing some causal LMs apply after the head, keyed by the config field that
# turns it on (transformers' modeling files: Gemma2/3ForCausalLM, GraniteForCausalLM,
# CohereForCausalLM). Without it a Gemma-2 log-prob is off by tens of nats.
LOGIT_PROCESSING = {
    "final_logit_softcapping": lambda logits, cap: torch.tanh(logits / cap) * cap,  # Gemma-2, Gemma-3
    "logits_scaling": lambda logits, scale: logits / scale,  # Granite
    "logit_scale": lambda logits, scale: logits * scale,  # Cohere
    "lm_head_multiplier": lambda logits, scale: logits * scale,  # Falcon-H1
}


def _logit_processing(config) -> list:
    """The (function, value) pairs of LOGIT_PROCESSING that ``config`` turns on."""
    on = [(apply, getattr(config, field, None)) for field, apply in LOGIT_PROCESSING.items()]
    return [(apply, value) for apply, value in on if value is not None and not isinstance(value, bool)]


def processes_logits(config) -> bool:
    """Whether the model applies any final processing to its head's output (LOGIT_PROCESSING)."""
    return bool(_logit_processing(config))


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``hidden`` (..., H) states: the head, then its final processing."""
    logits = model.get_output_embeddings()(hidden)
    for apply, value in _logit_processing(model.config):
        logits = apply(logits, value)
    return logits


def reads_block_masks(model) -> bool:
    """Whether ``model`` takes a 4D boolean attention mask as given and computes nothing else into
    it: transformers' SDPA attention does; eager attention would add the booleans to its scores, a
    sliding window (Mistral, Qwen2, Gemma 3) would be dropped, since the mask given replaces it, and
    ALiBi biases (Falcon's ``alibi``, BLOOM, MPT) are built from a 2D padding mask."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or uses_alibi(config):
        return False
    return not fused.sliding_window_in_use(getattr(config, "text_config", None) or config)


def uses_alibi(config) -> bool:
    """Whether the model adds ALiBi position biases (Falcon with ``alibi``, BLOOM, MPT)."""
    attention = getattr(config, "attn_config", None)
    return bool(getattr(config, "alibi", False) or getattr(config, "model_type", None) == "bloom"
                or getattr(attention, "alibi", False) or (isinstance(attention, dict) and attention.get("alibi")))


def head_gap(model) -> float:
    """Largest relative gap between the model's own forward's logits and ``lm_logits`` on its
    hidden states, over five tokens. load.py refuses a model where it is not ~0: an architecture
    with a final step this module does not know would otherwise give wrong log-probs silently."""
    ids = torch.arange(1, 6, device=model.device).remainder(model.get_input_embeddings().num_embeddings)[None]
    mask = torch.ones_like(ids)
    with eval_mode(model):
        ours = as_forward(model, lambda m: lm_logits(m, hidden_states(m, ids, mask))).float()
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits.float()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1.0)).item()


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor | None = None, stat: Callable | None = None,
                   position_ids: torch.Tensor | None = None, temperature: float = 1.0, stat_grad: bool = False):
    return as_forward(model, _token_logprobs, input_ids, attention_mask, target_mask, stat, position_ids,
                      temperature, stat_grad)


def entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v of each row of log-probabilities over the vocabulary. (N,)"""
    return -(logp_all.exp() * logp_all).sum(-1)


def log_square_mass(logp_all: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 of each row of log-probabilities over the vocabulary (WPO's weights). (N,)"""
    return torch.logsumexp(2 * logp_all, -1)


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits of the distribution sampled at ``temperature`` (0, greedy, and 1: as they are)."""
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def _token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    target_mask: torch.Tensor | None = None, stat: Callable | None = None,
                    position_ids: torch.Tensor | None = None, temperature: float = 1.0, stat_grad: bool = False):
    """(B, T) log-probs of each token given its prefix; logits only where ``target_mask`` is set.

    Skipping the prompt positions' logits is the main saving for short answers after long
    prompts. With ``stat`` (``entropy``, ``log_square_mass``: of the next-token log-probs over
    the vocabulary) also returns its (B, T) values at the same positions, computed without
    gradient unless ``stat_grad`` (an entropy bonus's). A packed batch
    passes its 4D mask, its ``position_ids`` and a ``target_mask``. ``temperature``: of
    softmax(logits / T), the distribution RL samples were drawn from.
    """
    select = (target_mask[:, 1:] if target_mask is not None else attention_mask[:, 1:]).bool()  # (B, T-1)
    targets = input_ids[:, 1:]  # (B, T-1)
    logp_all = _selected_logits(model, input_ids, attention_mask, select, position_ids, temperature).log_softmax(-1)
    picked = logp_all.gather(-1, targets[select].unsqueeze(-1)).squeeze(-1)  # (N,)
    logprobs = _unselect(picked, select)
    if stat is None:
        return logprobs
    with contextlib.nullcontext() if stat_grad else torch.no_grad():
        return logprobs, _unselect(stat(logp_all), select)


def _selected_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
                     position_ids: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) fp32 logits / ``temperature`` at the N positions ``select`` (B, T-1) marks, each the
    position before a target token (the one that predicts it); no other position's logits are made."""
    first = first_column(select)  # no position before it predicts a target: the last layer skips them
    hidden = hidden_states(model, input_ids, attention_mask, position_ids, first)[:, :-1]  # (B, T-1-first, H)
    return scaled(lm_logits(model, hidden[select[:, first:]]).float(), temperature)


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  target_mask: torch.Tensor) -> torch.Tensor:
    """(N, V) fp32 next-token logits (the model's own, temperature 1) predicting each of the N tokens
    ``target_mask`` (B, T) sets, in row-major order: what a divergence over the whole vocabulary
    reads (distillation)."""
    return as_forward(model, _selected_logits, input_ids, attention_mask, target_mask[:, 1:].bool())


def predecessor_logprobs(model, input_ids: torch.Tensor, attend: torch.Tensor, position_ids: torch.Tensor,
                         predecessor: torch.Tensor, targets: torch.Tensor, stat: Callable | None = None,
                         temperature: float = 1.0, stat_grad: bool = False):
    """(M,) log-probs of ``targets``, each predicted at the flat position ``predecessor`` of a
    shared-prompt layout (rows of a prompt once, then its continuations, under a block mask
    ``attend``): the logits of exactly those M positions, and ``stat``'s (M,) values there (as
    ``token_logprobs``'; None without one). ``temperature`` as ``token_logprobs``'. Called inside
    ``as_forward``."""
    first, rows = flat_window(predecessor, input_ids.shape[1])
    hidden = hidden_states(model, input_ids, attend, position_ids, first)  # (R, W - first, H)
    logp_all = scaled(lm_logits(model, hidden.flatten(0, 1)[rows]).float(), temperature).log_softmax(-1)  # (M, V)
    picked = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (M,)
    if stat is None:
        return picked, None
    with contextlib.nullcontext() if stat_grad else torch.no_grad():
        return picked, stat(logp_all)


def _unselect(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Put (N,) values back at the (B, T-1) selected places, zeros elsewhere, shifted to (B, T)."""
    shifted = torch.zeros(select.shape, dtype=values.dtype, device=values.device).masked_scatter(select, values)
    return F.pad(shifted, (1, 0))


def keys_and_values_only(cache) -> bool:
    """Whether every layer of a transformers cache holds keys and values alone, so that its rows can
    be repeated (``batch_repeat_interleave``); a hybrid's linear-attention or Mamba layers keep a
    state that is not repeated with them."""
    import transformers.cache_utils as caches

    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4's DynamicCache: keys and values per layer, no layer objects
        return hasattr(cache, "batch_repeat_interleave") and type(cache).__name__ == "DynamicCache"
    state = getattr(caches, "LinearAttentionCacheLayerMixin", ())
    return all(isinstance(layer, caches.DynamicLayer) and not isinstance(layer, state) for layer in layers)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; support both."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_with_cache(model, input_ids, attention_mask, position_ids, cache=None, logits_to_keep: int = 1):
    """One cached forward step: returns (last-position logits (B, V) in fp32, the updated cache).
    A mixture of experts' router logits are not asked for (its config's ``output_router_logits``
    would have transformers compute the training-time balancing loss on one token each step)."""
    kwargs = {_cache_kwarg(type(model)): cache} if cache is not None else {}
    if getattr(model.config, "output_router_logits", False):
        kwargs["output_router_logits"] = False
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=logits_to_keep, **kwargs)
    new_cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits[:, -1].float(), new_cache
