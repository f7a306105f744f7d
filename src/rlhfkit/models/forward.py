"""Forward passes that every method shares: per-token log-probs of given tokens.

Conventions: ``logprobs[:, t] = log pi(input_ids[:, t] | input_ids[:, <t])`` so a token mask
applies to log-probs unshifted; position 0 has no prediction and gets 0. Position ids always
come from the attention mask, so left- and right-padded rows give the same numbers.

These functions call the backbone and the head themselves (to skip logits nobody reads), so
each runs through ``as_forward``: on a model sharded with FSDP2 the root module's own parameters
(embeddings, final norm, head) are gathered only around a registered forward method, and
``as_forward`` is that method (train/shard.py registers it); on any other model it is a call.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.nn.functional as F

ENTRY = "rlhfkit_forward"


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode, without gradients, restored to its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


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


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states (B, T, H), without computing any vocabulary logits."""
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor | None = None, with_entropy: bool = False):
    return as_forward(model, _token_logprobs, input_ids, attention_mask, target_mask, with_entropy)


def _token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    target_mask: torch.Tensor | None = None, with_entropy: bool = False):
    """(B, T) log-probs of each token given its prefix; logits only where ``target_mask`` is set.

    Skipping the prompt positions' logits is the main saving for short answers after long
    prompts. With ``with_entropy`` also returns the (B, T) entropy of the next-token
    distribution at the same positions (a metric: computed without gradient).
    """
    hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
    targets = input_ids[:, 1:]  # (B, T-1)
    select = (target_mask[:, 1:] if target_mask is not None else attention_mask[:, 1:]).bool()
    logits = model.get_output_embeddings()(hidden[select]).float()  # (N, V)
    logp_all = logits.log_softmax(-1)
    picked = logp_all.gather(-1, targets[select].unsqueeze(-1)).squeeze(-1)  # (N,)
    logprobs = _unselect(picked, select)
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, _unselect(entropy, select)


def _unselect(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Put (N,) values back at the (B, T-1) selected places, zeros elsewhere, shifted to (B, T)."""
    shifted = torch.zeros(select.shape, dtype=values.dtype, device=values.device).masked_scatter(select, values)
    return F.pad(shifted, (1, 0))


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; support both."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_with_cache(model, input_ids, attention_mask, position_ids, cache=None, logits_to_keep: int = 1):
    """One cached forward step: returns (last-position logits (B, V) in fp32, the updated cache)."""
    kwargs = {_cache_kwarg(type(model)): cache} if cache is not None else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=logits_to_keep, **kwargs)
    new_cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits[:, -1].float(), new_cache
