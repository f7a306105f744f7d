"""A lean backbone forward for Llama-family models (llama, qwen2, mistral), for training and scoring.

Same numbers as the Hugging Face forward (tests compare hidden states and gradients to 1e-5),
fewer operations. On the short rows of RLHF batches much of a step's time is the cost of
launching small operations and recording them for autograd, not arithmetic, so this forward
(about 1.05x per training step on the reference model, measured in one process)

- applies the rotary embedding to q and k in one function whose backward is written out:
  with ``x = [x1, x2]`` (halves of a head), ``rot(x) = [-x2, x1]`` and ``y = x cos + rot(x) sin``,
  ``dx1 = g1 cos1 + g2 sin2`` and ``dx2 = g2 cos2 - g1 sin1``,
- computes RMSNorm ``y = w x / sqrt(mean(x^2) + eps)`` and SwiGLU ``silu(a) b`` as single autograd
  nodes with their closed-form backward, and
- builds the attention mask once per call (none at all for unpadded rows: SDPA's causal path).

On the CPU in fp32 (autocast off) every decoder layer runs as one autograd node instead
(``_Layers``, ``layers_forward`` without gradients): nothing is recorded per operation, the
backward is written out (the products, SDPA's own flash kernels or, on rows of up to
``FEW_KEYS`` keys, attention as its own products, the closed forms above), q, k and v take one
product each way in the backward, the rows are padded to oneDNN's bucket once, and the last layer
computes queries, the MLP and its output only for the columns a caller reads (``first``; the
per-operation path does the same). 1.04-1.13x per training step on the reference shapes,
in-process A/B, and 1.04-1.06x more for SFT, RM and DPO from the attention as products;
``RLHFKIT_LAYERS_NODE=0`` turns it off.

It applies to a model whose layers it can read as plain modules; anything else (LoRA adapters,
FSDP2-sharded layers, activation checkpointing, sliding windows, attention other than SDPA,
dropout in attention, another activation) goes through the model's own forward.
``RLHFKIT_LEAN_FORWARD=0`` turns it off everywhere.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import kernels
from .script import LAYERS, scripted

SUPPORTED = {"llama", "qwen2", "mistral"}


def sliding_window_in_use(config) -> bool:
    """Whether some layer attends within a sliding window (Mistral's ``sliding_window``, Qwen2's
    ``use_sliding_window``, ``layer_types`` holding anything but full attention)."""
    return (bool(getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))
            or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()))


def llama_like(config) -> bool:
    """A decoder that this module and the sampler's lean decoder (lean.py) compute as the model
    does: llama, qwen2 or mistral, a SiLU MLP, full attention in every layer."""
    return (config.model_type in SUPPORTED and getattr(config, "hidden_act", None) == "silu"
            and getattr(config, "pretraining_tp", 1) == 1 and not sliding_window_in_use(config))


def applies(model) -> bool:
    """Whether :func:`backbone` computes this model's forward (see the module docstring)."""
    if os.environ.get("RLHFKIT_LEAN_FORWARD", "1") == "0":
        return False
    cfg = model.config
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if (not llama_like(cfg) or layers is None or len(layers) == 0
            or getattr(cfg, "_attn_implementation", None) != "sdpa"
            or getattr(layers[0], "gradient_checkpointing", False)
            or (model.training and getattr(cfg, "attention_dropout", 0.0))):
        return False
    layer = layers[0]
    if _sharded(model, layer) or getattr(model, "peft_config", None):
        return False  # peft's adapters, in every layer or only in some (lora.target_modules): its own forward
    modules = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, base.embed_tokens, layer)
    return all(_plain(type(m)) for m in modules)  # another library's wrappers


_PLAIN: dict = {}  # module class -> whether it is one this module reads the weights of as they are


def _plain(cls: type) -> bool:
    """torch's own Linear and Embedding (or rlhfkit's kernels of them), a transformers decoder
    layer; not peft's or another library's wrapper. Checked per forward, so cached per class."""
    if cls not in _PLAIN:
        weights = issubclass(cls, (torch.nn.Linear, torch.nn.Embedding)) and cls.__module__.startswith(("torch.nn", "rlhfkit"))
        _PLAIN[cls] = weights or (cls.__module__.startswith("transformers") and cls.__name__.endswith("DecoderLayer"))
    return _PLAIN[cls]


def _sharded(*modules) -> bool:
    """Whether FSDP2 shards any of ``modules`` (its hooks gather the parameters around each module's
    own forward, which this one does not call)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in modules)


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dimension, kept for broadcasting (the sampler's
    TorchScript decoder, lean.py, runs it too)."""
    return x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()


class _RMSNorm(torch.autograd.Function):
    """``y = w * x r`` with ``r = 1 / sqrt(mean(x^2) + eps)``; backward
    ``dx = r (g w - x_hat mean(g w x_hat))``, ``dw = sum_rows(g x_hat)``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = inv_rms(x, eps)
        x_hat = x * r
        ctx.save_for_backward(x_hat, r, weight)
        return weight * x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, r, weight = ctx.saved_tensors
        grad_w = (g * x_hat).reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gw = g * weight
        grad_x = (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True)).mul_(r)
        return grad_x, grad_w, None


class _SwiGLU(torch.autograd.Function):
    """``silu(a) * b`` (gate and up projections); backward ``da = g b silu'(a)``, ``db = g silu(a)``."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return torch.ops.aten.silu_backward(g * b, a), g * F.silu(a)


class _Rope(torch.autograd.Function):
    """Rotate q (B, T - first, Hq, D), the queries of columns ``first``.., and k (B, T, Hk, D) by
    ``cos`` and ``sin``'s ``rotation_tables`` (B, T, 1, D): ``y = x cos + rot(x) sin``, and back:
    ``dx = g cos + rot^T(g sin)``."""

    @staticmethod
    def forward(ctx, q, k, cos, tables, first):
        ctx.save_for_backward(cos, tables[1])
        ctx.first = first
        return rotate(q, cos[:, first:], tables[0][:, first:]), rotate(k, cos, tables[0])

    @staticmethod
    def backward(ctx, g_q, g_k):
        cos, back = ctx.saved_tensors
        f = ctx.first
        return rotate(g_q, cos[:, f:], back[:, f:]), rotate(g_k, cos, back), None, None, None


def rotation_tables(sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables ``rotate`` reads for the rotary embedding, ``[-sin1, sin2]``, and for its
    transpose, ``[sin2, -sin1]`` (halves of the head dimension)."""
    half = sin.shape[-1] // 2
    first, second = sin[..., :half], sin[..., half:]
    return torch.cat([-first, second], -1), torch.cat([second, -first], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``x cos + swap(x) table`` over the last dimension, ``swap([x1, x2]) = [x2, x1]`` (halves of
    a head). With ``rotation_tables``' first table that is the rotary embedding
    ``x cos + rot(x) sin``, ``rot([x1, x2]) = [-x2, x1]``; with the second, its transpose
    ``x cos + rot^T(x sin)``, ``rot^T([y1, y2]) = [y2, -y1]`` (the backward). The sampler's
    TorchScript decoder (lean.py) runs it too. (Swapping the halves with ``flip`` and one
    ``addcmul_`` gives the same numbers bit for bit, but its copy made it up to 1.3x slower.)"""
    half = x.size(-1) // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], table[..., :half])
    out[..., half:].addcmul_(x[..., :half], table[..., half:])
    return out


def _eps(norm: torch.nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm module ``norm`` applied to ``x`` (fp32 models: same numbers)."""
    eps = _eps(norm)
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(x)  # the module's own casts
    if not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)):
        return norm.weight * (x * inv_rms(x, eps))
    return _RMSNorm.apply(x, norm.weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, tables: tuple,
         first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q (the queries of columns ``first``..) and k rotated by the rotary embedding (``cos`` and
    ``rotation_tables(sin)`` of every column, broadcast against them)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rope.apply(q, k, cos, tables, first)
    return rotate(q, cos[:, first:], tables[0][:, first:]), rotate(k, cos, tables[0])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, one autograd node."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate).mul_(up)


def _causal(t: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(T, T) boolean: each query sees the keys up to its own column."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril_()


def _sdpa_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor | None:
    """None for unpadded (B, T) rows (SDPA's causal path), else a (B, 1, T, T) boolean mask:
    causal and padding for a (B, T) mask, as transformers builds it; a 4D one as given. (A query
    that sees no key, at left padding, gets zeros from SDPA, as in the model's own forward.)"""
    if attention_mask.dim() != 2:
        return attention_mask.bool()
    if bool(attention_mask.all()):
        return None
    causal = _causal(t, attention_mask.device)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def _one_node(x: torch.Tensor, params: list) -> bool:
    """Whether ``layers_forward`` (and ``_Layers`` for gradients) computes this forward: CPU fp32
    weights and inputs, autocast off."""
    if os.environ.get("RLHFKIT_LAYERS_NODE", "1") == "0":
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and all(p.dtype == torch.float32 for p in params if p is not None))


def backbone(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             first: int = 0) -> torch.Tensor:
    """The backbone's last hidden states at columns ``first``.. (B, T - first, H): the model's
    forward, computed leanly. The columns before ``first`` still serve as keys and values; the
    last layer computes no query, MLP or output for them."""
    base = getattr(model, model.base_model_prefix)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    x = base.embed_tokens(input_ids)
    b, t, _ = x.shape
    cos, sin = base.rotary_emb(x, position_ids)  # (B, T, D)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    mask = _sdpa_mask(attention_mask, t)
    params = [p for layer in base.layers for p in _layer_tensors(layer)]
    if _one_node(x, params):
        fast = isinstance(base.layers[0].self_attn.q_proj, kernels.FastLinear) and kernels.onednn_linear_available()
        eps = tuple(_eps(norm) for layer in base.layers
                    for norm in (layer.input_layernorm, layer.post_attention_layernorm))
        shape = (b, t, heads, kv_heads, head_dim, base.layers[0].self_attn.scaling, eps, fast, first)
        if mask is not None:  # the kernel takes an additive mask, as SDPA makes of a boolean one
            mask = torch.zeros(mask.shape, dtype=x.dtype).masked_fill_(~mask, float("-inf"))
        wanted = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
        if wanted:
            x = _Layers.apply(x.reshape(b * t, -1), cos, sin, mask, shape, *params)
        else:  # no graph: each layer's activations are freed as the next one runs
            x = layers_forward(x.reshape(b * t, -1), cos, sin, mask, shape, params)
        x = x.view(b, t - first, -1)
        return rms_norm(base.norm, x)
    tables = rotation_tables(sin)
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        f = first if i == len(base.layers) - 1 else 0  # the last layer's queries start at column ``first``
        h = rms_norm(layer.input_layernorm, x)
        q = attn.q_proj(h[:, f:]).view(b, t - f, heads, head_dim)
        k = attn.k_proj(h).view(b, t, kv_heads, head_dim)
        q, k = rope(q, k, cos, tables, f)
        v = attn.v_proj(h).view(b, t, kv_heads, head_dim)
        mask_q = mask
        if f:  # the window's queries over every key; SDPA's own causal flag would align them to the first key
            full = mask if mask is not None else _causal(t, x.device)[None, None]
            mask_q, x = full[:, :, f:], x[:, f:]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask_q, is_causal=mask_q is None, scale=attn.scaling,
                                             enable_gqa=kv_heads != heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t - f, heads * head_dim))
        h = rms_norm(layer.post_attention_layernorm, x)
        x = x + mlp.down_proj(swiglu(mlp.gate_proj(h), mlp.up_proj(h)))
    return rms_norm(base.norm, x)


# ---- The decoder layers as one autograd node (CPU, fp32) ----
#
# On the short rows of RLHF batches a layer's arithmetic is small beside what it costs to record
# twenty-odd autograd nodes per layer and replay them. ``_Layers`` computes every decoder layer's
# forward without recording anything and writes their backward out: the products, the attention's
# backward (``_attention_backward``), and the closed forms above for the norms, the rotation and
# SwiGLU.

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PER_LAYER = 2 + 2 * len(LINEARS)  # two norm weights, then each linear's weight and bias (or None)
assert PER_LAYER == 16  # as the TorchScript functions below slice and index them

# The node's forward runs as one TorchScript function (script.py; ``RLHFKIT_SCRIPTED_LAYERS=0``
# runs the same function in Python): the reference model's 370 operations are called from C++, the
# forward 1.13x faster on RM's 16 x 10 rows. TorchScript reads no module constants, so what it
# needs of this module's and kernels' (``FEW_KEYS``, ``_limit``: whether the products are oneDNN's
# and the most rows they pad to a bucket) comes in as arguments, read on every call. The backward's
# parts per layer are written so that TorchScript compiles them too, but they run in Python:
# compiled (as two halves), they gained 1.02-1.03x on the node's forward and backward but raised
# the 30M model's peak by 45 MB (SFT rows of 16 x 24). In Python, split where the code before
# them let tensors go, each part holds what the old loop held.


def _layer_tensors(layer) -> list:
    """One layer's parameters in ``_Layers``' order: the two norms' weights, then (weight, bias)
    of each of LINEARS."""
    out = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    for path in LINEARS:
        module = layer.get_submodule(path)
        out += [module.weight, module.bias]
    return out


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], limit: int) -> torch.Tensor:
    """x W^T + b: oneDNN's product on rows padded to their bucket (``limit`` >= 0, see ``_limit``) or F.linear."""
    if limit >= 0:
        return kernels.padded_product(x, w, b, kernels.bucket_within(x.size(0), limit))
    return F.linear(x, w, b)


def _input_grad(g: torch.Tensor, w: torch.Tensor, limit: int) -> torch.Tensor:
    if limit >= 0:
        return kernels.padded_product(g, w.t(), None, kernels.bucket_within(g.size(0), limit))
    return torch.mm(g, w)


def _weight_grad(g: torch.Tensor, x: torch.Tensor, limit: int) -> torch.Tensor:
    if limit >= 0:
        return kernels.padded_weight_grad(g, x, kernels.bucket_within(x.size(0), limit))
    return torch.mm(g.t(), x)


def _norm_backward(g: torch.Tensor, x_hat: torch.Tensor, r: torch.Tensor,
                   weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's backward (see _RMSNorm): (dx, dw)."""
    gw = g * weight
    return (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True)).mul_(r), (g * x_hat).sum(0)


# What the backward reads per layer, in this order. It recomputes what one elementwise operation
# makes from another saved tensor rather than keeping it: the norms' outputs h = w x_hat (and the
# last layer's window of h), SwiGLU's s = silu(gate) up, and the attention's output where its
# products' backward does not read it (the flash kernel's does); the same operations on the same
# inputs, so the same numbers. On the 30M model's GRPO update that is about 60 MB less at the peak.
SAVED = 17

# Up to this many keys a row's attention is computed as its products (scores, softmax, weights
# times values, and the backward's four products) rather than by SDPA's flash kernel, whose
# blocking costs more than the arithmetic on short rows. Forward and backward together, the
# reference model's heads, 2 threads: 1.3-2x faster at 22-74 keys, about even at 96-112, slower
# from 128 (where the weights, T^2 per head, also outgrow the flash kernel's T).
FEW_KEYS = 80

# PyTorch's CPU softmax (and its backward) over a last dimension shorter than one vector register
# of floats takes a slow path: (32, 4, 12, 12) scores took 167 us against 16 us for the same rows
# widened to 16 columns with -inf, 2 threads, AVX-512 (6 keys: 49 against 10; 15 keys: 252
# against 20). So ``_attention`` widens rows of fewer keys to SOFTMAX_MIN_KEYS columns: the extra
# columns get weight exactly 0 and change no sum, so the weights are those of the narrow softmax.
# 0 widens nothing.
SOFTMAX_MIN_KEYS = 16


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
               scale: float, few_keys: int, softmax_keys: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q k^T + mask) v over (B, heads, Tq, D) queries and (B, heads, T, D) keys and
    values, and what the backward reads besides them: the flash kernel's log-sum-exp, or, up to
    ``few_keys`` keys, the attention weights P (B, heads, Tq, T), widened with zero weights to
    ``softmax_keys`` columns on shorter rows (q, k, v contiguous then). A query that sees no key
    gets zeros, as from SDPA. ``causal`` (no mask): each query sees keys up to its own."""
    b, heads, tq, d = q.shape
    t = k.size(2)
    if t > few_keys:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                           scale=scale)
        return flash[0], flash[1]
    if mask is None:
        mask = _query_mask(None, t, t - tq, q.dtype)
    scores = torch.bmm(q.view(b * heads, tq, d), k.view(b * heads, t, d).transpose(1, 2)).view(b, heads, tq, t)
    logits = torch.add(mask, scores, alpha=scale)
    width = max(t, softmax_keys)
    if width > t:  # the extra columns -inf: weight 0
        wide = logits.new_full((b, heads, tq, width), float("-inf"))
        wide[:, :, :, :t] = logits
        logits = wide
    p = logits.softmax(-1)
    dead = mask.amax(-1, keepdim=True) == float("-inf")  # queries with no key: NaN rows of the softmax
    if bool(dead.any()):
        p.masked_fill_(dead, 0.0)
    weights = p.view(b * heads, tq, p.size(-1))[:, :, :t]
    return torch.bmm(weights, v.view(b * heads, t, d)).view(b, heads, tq, d), p


def _attention_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor],
                        state: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``_attention``, the way its forward went (``state``: the flash kernel's
    log-sum-exp, (B, heads, Tq), or the weights P, (B, heads, Tq, T or wider)). With
    S = scale q k^T + mask, P its softmax and O = P v: dv = P^T dO, dP = dO v^T, dS = P (dP - rowsum(dP P)),
    dq = scale dS k, dk = scale dS^T q."""
    b, heads, tq, d = q.shape
    t = k.size(2)
    if state.dim() == 3:
        assert out is not None  # kept for the flash kernel's backward
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, state, 0.0, causal, attn_mask=mask, scale=scale)
        return grads[0], grads[1], grads[2]
    width = state.size(-1)  # T, or wider where the forward widened the softmax (SOFTMAX_MIN_KEYS)
    p = state.view(b * heads, tq, width)
    g = g.reshape(b * heads, tq, d)
    g_v = torch.bmm(p[:, :, :t].transpose(1, 2), g)
    g_p = torch.bmm(g, v.view(b * heads, t, d).transpose(1, 2))
    if width > t:  # zero gradient at the extra columns, whose weights are 0: their g_s is 0 too
        g_p = torch.cat([g_p, g_p.new_zeros(b * heads, tq, width - t)], -1)
    g_s = torch._softmax_backward_data(g_p, p, -1, p.dtype)[:, :, :t]
    g_s.mul_(scale)
    g_q = torch.bmm(g_s, k.view(b * heads, t, d))
    g_k = torch.bmm(g_s.transpose(1, 2), q.view(b * heads, tq, d))
    return g_q.view(b, heads, tq, d), g_k.view(b, heads, t, d), g_v.view(b, heads, t, d)


def _padded(x2d: torch.Tensor, limit: int) -> torch.Tensor:
    """``x2d`` with zero rows up to its bucket for oneDNN's products (``limit`` >= 0), else as it is."""
    return kernels.pad_rows(x2d, kernels.bucket_within(x2d.size(0), limit)) if limit >= 0 else x2d


def _window(x2d: torch.Tensor, b: int, t: int, first: int, limit: int) -> torch.Tensor:
    """The rows of columns ``first``.. of the (B, T) grid that ``x2d``'s first B T rows hold, as
    rows of their own (zero rows up to oneDNN's bucket, ``limit`` >= 0)."""
    rows = x2d[:b * t].view(b, t, -1)[:, first:].reshape(b * (t - first), -1)
    return _padded(rows, limit)


def _query_mask(mask: Optional[torch.Tensor], t: int, first: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of the queries at columns ``first``.. over all T keys (causal if None)."""
    if mask is not None:
        return mask[:, :, first:]
    allowed = _causal(t)[None, None, first:]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _rows_like(x: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """An uninitialised (rows of ``x``, ``width``) tensor whose rows from ``n`` on are zero."""
    out = x.new_empty(x.size(0), width)
    out[n:].zero_()
    return out


def layers_forward(x, cos, sin, mask, shape, params, saved: list | None = None) -> torch.Tensor:
    """``_Layers``' forward without autograd: the rows of columns ``first``.. of the last layer's
    output. ``saved``: a list to append what the backward reads to (None: keep nothing, for a
    forward without gradients, whose activations are then freed layer by layer)."""
    b, t, heads, kv_heads, head_dim, scale, eps, fast, first = shape
    out, kept = scripted(_layers_forward, LAYERS)(x, cos, sin, mask, b, t, heads, kv_heads, head_dim, scale, list(eps),
                                                  _limit(fast), first, FEW_KEYS, SOFTMAX_MIN_KEYS, list(params),
                                                  saved is not None)
    if saved is not None:
        saved += kept
    return out


def _limit(fast: bool) -> int:
    """The products' ``limit`` argument: for oneDNN's products the most rows padded to a bucket
    (``kernels.row_limit()``, 0 where bucketing is off), -1 for F.linear."""
    return kernels.row_limit() if fast else -1


def _layers_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor], b: int,
                    t: int, heads: int, kv_heads: int, head_dim: int, scale: float, eps: List[float], limit: int,
                    first: int, few_keys: int, softmax_keys: int, params: List[Optional[torch.Tensor]],
                    keep: bool) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """``layers_forward`` (TorchScript): the output rows, and what the backward reads if ``keep``."""
    saved: List[Optional[torch.Tensor]] = []
    causal, repeat, layers = mask is None, heads // kv_heads, len(eps) // 2
    n = b * t
    x = _padded(x, limit)
    table = rotation_tables(sin)[0]
    for i in range(layers):
        w1, w2, wq, bq, wk, bk, wv, bv, wo, bo, wg, bg, wu, bu, wd, bd = params[i * 16:(i + 1) * 16]  # PER_LAYER
        assert w1 is not None and w2 is not None and wq is not None and wk is not None and wv is not None
        assert wo is not None and wg is not None and wu is not None and wd is not None
        f = first if i == layers - 1 else 0  # the last layer's queries start at column ``first``
        tq = t - f
        r1 = inv_rms(x, eps[2 * i])
        x_hat1 = x * r1
        h1 = w1 * x_hat1
        k = rotate(_linear(h1, wk, bk, limit)[:n].view(b, t, kv_heads, head_dim), cos, table).transpose(1, 2)
        v = _linear(h1, wv, bv, limit)[:n].view(b, t, kv_heads, head_dim).transpose(1, 2)
        h1_q, mask_q = h1, mask
        if f > 0:
            x, h1_q, mask_q = _window(x, b, t, f, limit), _window(h1, b, t, f, limit), _query_mask(mask, t, f, x.dtype)
        q = _linear(h1_q, wq, bq, limit)[:b * tq].view(b, tq, heads, head_dim)
        q = rotate(q, cos[:, f:], table[:, f:]).transpose(1, 2)
        if repeat > 1:  # grouped-query attention: each key/value head serves ``repeat`` query heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if t <= few_keys:  # (B, heads, T, D) as laid out for the batched products, here and in the backward
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _attention(q, k, v, mask_q, causal and f == 0, scale, few_keys, softmax_keys)  # (B, heads, Tq, D)
        a = _rows_like(x, heads * head_dim, b * tq)
        a[:b * tq].view(b, tq, heads, head_dim).copy_(out.transpose(1, 2))
        x = x + _linear(a, wo, bo, limit)
        r2 = inv_rms(x, eps[2 * i + 1])
        x_hat2 = x * r2
        h2 = w2 * x_hat2
        gate, up = _linear(h2, wg, bg, limit), _linear(h2, wu, bu, limit)
        s = F.silu(gate).mul_(up)
        x = x + _linear(s, wd, bd, limit)
        if keep:  # None: recomputed by the backward (see SAVED)
            saved += [x_hat1, r1, None, None, mask_q, q, k, v, out if lse.dim() == 3 else None, lse, a,
                      x_hat2, r2, None, gate, up, None]
    return x[:b * (t - first)], saved


class _Layers(torch.autograd.Function):
    """Every decoder layer on the residual stream ``x`` (N = B T rows, H), one node.

    With oneDNN's products the stream carries zero rows up to ``kernels.bucket(N)`` from the
    start, rather than each product padding its operands (two copies per product otherwise); the
    extra rows never reach the attention, and their gradient is zero, so they add nothing to any
    weight's gradient.

    ``shape`` = (B, T, heads, kv_heads, head_dim, scale, eps of each layer's two norms, fast,
    first); the output is the rows of columns ``first``.. only: the last layer's queries, output
    projection and MLP run on those rows alone (the earlier columns are its keys and values);
    ``params``: PER_LAYER tensors per layer (``_layer_tensors``). With ``r = 1/sqrt(mean(x^2)+eps)``:

        h = w1 x r,  q, k, v = rope(h Wq^T + bq), rope(h Wk^T + bk), h Wv^T + bv
        x' = x + attention(q, k, v) Wo^T + bo,  h' = w2 x' r'
        out = x' + (silu(h' Wg^T + bg) * (h' Wu^T + bu)) Wd^T + bd
    """

    @staticmethod
    def forward(ctx, x, cos, sin, mask, shape, *params):
        saved = []
        out = layers_forward(x, cos, sin, mask, shape, params, saved)
        ctx.save_for_backward(x, cos, sin, mask, *params)  # x: for a second backward (see there)
        # the activations, which nothing outside the node sees, on ctx itself: the backward lets
        # each layer's go once it is done with them (a saved tensor lives until the whole node's
        # backward returns: at 119M parameters, 47 MB more at SFT's peak than the per-operation graph)
        ctx.activations = saved
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, g):
        x, cos, sin, mask, *params = ctx.saved_tensors
        saved, ctx.activations = ctx.activations, None
        if saved is None:  # a second backward through a retained graph: the first let them go; the same again
            saved = []
            layers_forward(x, cos, sin, mask, ctx.shape, params, saved)
        b, t, heads, kv_heads, head_dim, scale, eps, fast, first = ctx.shape
        limit = _limit(fast)
        needs = ctx.needs_input_grad[5:]
        grads = [None] * len(params)
        n = b * t
        g = kernels.pad_rows(g, saved[-SAVED + 11].shape[0])  # the last layer's rows (x_hat2's), zeros below
        back = rotation_tables(sin)[1]
        for i in reversed(range(len(eps) // 2)):
            x_hat1, r1, _, _, mask_q, q, k, v, out, lse, a, x_hat2, r2, _, gate, up, _ = saved[SAVED * i:SAVED * (i + 1)]
            saved[SAVED * i:SAVED * (i + 1)] = [None] * SAVED  # this layer's go with the names below
            w = params[i * PER_LAYER:(i + 1) * PER_LAYER]
            need = list(needs[i * PER_LAYER:(i + 1) * PER_LAYER])
            g, mine = _mlp_backward(g, x_hat2, r2, gate, up, w[1], w[10], w[12], w[14], need, limit, _slots())
            del gate, up, x_hat2, r2  # done with: let them go before the attention's
            parts, mine = _attention_core_backward(g, q, k, v, out, lse, a, mask_q, w[8], cos, back, b, t, heads,
                                                   kv_heads, head_dim, scale, mask is None, need, limit, mine)
            tq = q.shape[2]
            del mask_q, q, k, v, out, lse, a  # before the projections' products
            g_h1, mine = _projections_backward(g, parts, x_hat1, w[0], w[2], w[4], w[6], b, t, tq, heads, head_dim,
                                               need, limit, mine)
            del parts
            g, mine[0] = _input_norm_backward(g, g_h1, x_hat1, r1, w[0], b, t, tq)
            del g_h1, x_hat1, r1
            grads[i * PER_LAYER:(i + 1) * PER_LAYER] = [grad if wanted else None for grad, wanted in zip(mine, need)]
        return (g[:n], None, None, None, None, *grads)


def _slots() -> List[Optional[torch.Tensor]]:
    """A layer's PER_LAYER gradient slots, all None (TorchScript: typed)."""
    return [None for _ in range(16)]


def _mlp_backward(g: torch.Tensor, x_hat2: torch.Tensor, r2: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  w2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, need: List[bool], limit: int,
                  mine: List[Optional[torch.Tensor]]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """The backward of a layer's MLP half, out = x' + s Wd^T + bd with s = silu(gate) * up and
    h' = w2 x_hat2: the gradient of x', and ``mine``, the layer's gradient slots, with those of w2
    and of the MLP's weights and biases filled in (where ``need`` asks)."""
    silu_gate = F.silu(gate)
    if need[14]:
        mine[14] = _weight_grad(g, silu_gate * up, limit)
    if need[15]:
        mine[15] = g.sum(0)
    g_s = _input_grad(g, wd, limit)
    g_up = g_s * silu_gate
    del silu_gate
    g_gate = torch.ops.aten.silu_backward(g_s * up, gate)
    if need[10] or need[12]:
        mine[10], mine[12] = _gate_up_weight_grads(g_gate, g_up, w2 * x_hat2, need[10], need[12], limit)
    if need[11]:
        mine[11] = g_gate.sum(0)
    if need[13]:
        mine[13] = g_up.sum(0)
    g_h2 = _input_grad(g_gate, wg, limit).add_(_input_grad(g_up, wu, limit))
    g_x, mine[1] = _norm_backward(g_h2, x_hat2, r2, w2)
    return g + g_x, mine


def _gate_up_weight_grads(g_gate: torch.Tensor, g_up: torch.Tensor, h2: torch.Tensor, gate: bool, up: bool,
                          limit: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gate's and up's weight gradients (where asked) from their input h' (let go on return)."""
    return (_weight_grad(g_gate, h2, limit) if gate else None), (_weight_grad(g_up, h2, limit) if up else None)


def _attention_core_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: Optional[torch.Tensor], lse: torch.Tensor, a: torch.Tensor,
                             mask_q: Optional[torch.Tensor], wo: torch.Tensor, cos: torch.Tensor, back: torch.Tensor,
                             b: int, t: int, heads: int, kv_heads: int, head_dim: int, scale: float, causal: bool,
                             need: List[bool], limit: int,
                             mine: List[Optional[torch.Tensor]]) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """The backward of a layer's x' = x + attention(q, k, v) Wo^T + bo up to q, k and v: their
    gradients before the rotation's, rotated back ((B, T, heads, D) each, q's at its Tq columns),
    and ``mine`` with the slots of o's weight and bias filled in (where ``need`` asks)."""
    repeat = heads // kv_heads
    tq = q.size(2)
    f, nq = t - tq, b * tq
    if need[8]:
        mine[8] = _weight_grad(g, a, limit)
    if need[9]:
        mine[9] = g.sum(0)
    g_out = _input_grad(g, wo, limit)[:nq].view(b, tq, heads, head_dim).transpose(1, 2)
    g_q, g_k, g_v = _attention_backward(g_out, q, k, v, out, lse, mask_q, causal and f == 0, scale)
    if repeat > 1:
        g_k = g_k.unflatten(1, (kv_heads, repeat)).sum(2)
        g_v = g_v.unflatten(1, (kv_heads, repeat)).sum(2)
    return [rotate(g_q.transpose(1, 2), cos[:, f:], back[:, f:]), rotate(g_k.transpose(1, 2), cos, back),
            g_v.transpose(1, 2)], mine


def _projections_backward(g: torch.Tensor, parts: List[torch.Tensor], x_hat1: torch.Tensor, w1: torch.Tensor,
                          wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, b: int, t: int, tq: int, heads: int,
                          head_dim: int, need: List[bool], limit: int,
                          mine: List[Optional[torch.Tensor]]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """The backward of q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv with h = w1 x_hat1 (q from
    the columns Tq.. of a window): the gradient of h, and ``mine`` with the slots of q, k and v's
    weights and biases filled in (where ``need`` asks). ``g``: the residual's gradient (its rows)."""
    f, nq, n = t - tq, b * tq, b * t
    # the projections that read the same h take one product each way (fewer, larger products
    # are faster at these sizes: 1.6x for q, k and v on the reference model's 144 rows)
    slots = [0, 1, 2] if f == 0 else [1, 2]  # with a window, q reads only its rows of h
    h1: Optional[torch.Tensor] = None
    if need[2] or need[4] or need[6]:
        h1 = w1 * x_hat1
    g_h1_q: Optional[torch.Tensor] = None
    if f > 0:
        g_q_rows = _rows_like(g, heads * head_dim, nq)
        g_q_rows[:nq].view(b, tq, heads, head_dim).copy_(parts[0])
        if need[2] and h1 is not None:
            mine[2] = _weight_grad(g_q_rows, _window(h1, b, t, f, limit), limit)
        if need[3]:
            mine[3] = g_q_rows.sum(0)
        g_h1_q = _input_grad(g_q_rows, wq, limit)
    sizes = [parts[j].size(2) * head_dim for j in slots]
    g_proj = _rows_like(x_hat1, sum(sizes), n)
    columns = g_proj[:n].split(sizes, 1)
    for c in range(len(slots)):
        columns[c].view(b, t, -1, head_dim).copy_(parts[slots[c]])
    if h1 is not None and (need[2 + 2 * slots[0]] or need[4] or need[6]):
        weight_grads = _weight_grad(g_proj, h1, limit).split(sizes)
        for c in range(len(slots)):
            mine[2 + 2 * slots[c]] = weight_grads[c]
    if need[3 + 2 * slots[0]] or need[5] or need[7]:
        bias_grads = g_proj.sum(0).split(sizes)
        for c in range(len(slots)):
            mine[3 + 2 * slots[c]] = bias_grads[c]
    weights = [wq, wk, wv]
    g_h1 = _input_grad(g_proj, torch.cat([weights[j] for j in slots]), limit)
    if g_h1_q is not None:
        g_h1[:n].view(b, t, -1)[:, f:] += g_h1_q[:nq].view(b, tq, -1)
    return g_h1, mine


def _input_norm_backward(g: torch.Tensor, g_h1: torch.Tensor, x_hat1: torch.Tensor, r1: torch.Tensor, w1: torch.Tensor,
                         b: int, t: int, tq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradient of the layer's input x (h = w1 x_hat1 and the residual ``g``, which carried
    only the window's rows where Tq < T), and w1's."""
    g_x, grad_w1 = _norm_backward(g_h1, x_hat1, r1, w1)
    if tq < t:  # the residual carried only the window's rows
        g_x[:b * t].view(b, t, -1)[:, t - tq:] += g[:b * tq].view(b, tq, -1)
        return g_x, grad_w1
    return g + g_x, grad_w1
