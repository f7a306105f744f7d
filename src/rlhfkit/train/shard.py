"""``train.strategy``: how trained and frozen models are spread over ranks.

``replicate`` (the default): every rank holds the whole model; each loss is divided by the
global count and gradients are summed over ranks with one all-reduce per step (dist.py).

``fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``). Each decoder layer (the
model's ``_no_split_modules`` classes) is one group; then the root: the embeddings, final norm
and head together, so tied embeddings stay tied. Trained models get their optimizer state
sharded with them; frozen ones (reference, reward model) are sharded and have none. The
gradient convention stays "divide by the global count, sum over ranks": FSDP2 averages by
default, so the divide factor is set to 1, with sum reductions forced (gloo has no PREMUL_SUM).
rlhfkit's forwards call the backbone and the head themselves; they run through
``models.forward.as_forward``, registered here as a forward method of the root so that FSDP2
gathers the root's parameters around it. Copies (a frozen reference, a rollout backend's
copy) are made before sharding: a sharded model cannot be deep-copied.

With one process ``fsdp`` shards nothing but still writes checkpoints in the sharded (DCP)
format, so that a run can move between 1 and N ranks.
"""

from __future__ import annotations

import torch

from ..models.forward import ENTRY, install_entry, reshard
from ..models.load import full_state_dict, is_sharded, save_model
from .dist import DistInfo, barrier

STRATEGIES = ("replicate", "fsdp")


def shard(model: torch.nn.Module, info: DistInfo, strategy: str, dtype: str = "fp32") -> torch.nn.Module:
    """Shard ``model`` in place under ``fsdp`` with more than one rank; otherwise leave it as it is.
    ``dtype`` bf16: FSDP2 gathers the parameters in bf16 and runs the forward in it (gradients
    reduced in fp32); fp32: the parameters stay in the dtype they were loaded in."""
    if strategy != "fsdp" or not info.enabled:
        return model
    import torch.distributed as dist
    from torch.distributed.fsdp import (
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" \
        else MixedPrecisionPolicy()
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"train.strategy=fsdp: {type(model).__name__} names no decoder layer class "
                         "(_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: embeddings, final norm and head in one group
    install_entry(model)
    register_fsdp_forward_method(model, ENTRY)
    force_sum = dist.get_backend() == "gloo"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if force_sum:
                module.set_force_sum_reduction_for_comms(True)
    return model


@torch.no_grad()
def mix_toward(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's soft update, in place: each parameter of ``target`` becomes alpha x ``source``'s +
    (1 - alpha) x its own (the two built alike: under FSDP2 sharded alike, each rank mixing its shards)."""
    mine, theirs = dict(reshard(target).named_parameters()), dict(reshard(source).named_parameters())
    if mine.keys() != theirs.keys():
        differ = sorted(mine.keys() ^ theirs.keys())[:4]
        raise RuntimeError(f"TR-DPO: the reference's parameters are not the policy's ({', '.join(differ)})")
    for name, weight in mine.items():
        weight.mul_(1 - alpha).add_(theirs[name].detach(), alpha=alpha)


def save_everywhere(model, tokenizer, out_dir, info: DistInfo, merge: bool = False) -> None:
    """Save a ``save_pretrained`` folder from rank 0 (models/load.py ``save_model``: a LoRA model
    as its adapter, and merged with ``merge``); every rank joins the gather of a sharded model."""
    state = full_state_dict(model) if is_sharded(model) else None
    if info.is_main:
        save_model(model, tokenizer, out_dir, state, merge)
    barrier(info)
