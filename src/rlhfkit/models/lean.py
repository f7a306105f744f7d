"""A lean KV-cache decoder for Llama-family models (llama, qwen2, mistral) used by the sampler.

It runs the model's own weights and rotary embedding but skips the generic forward's per-step
work: no cache objects, no mask building from scratch, q/k/v and gate/up each computed by one
fused matmul on layers of up to STACK_MAX_BYTES (the weights laid out in oneDNN's own format
when the call decodes enough tokens to repay it, or, where BLAS runs the decoder's products
(kernels.decode_kernel), packed by MKL for the decode steps' row count: 1.3-2.3x faster skinny
products on the AMX host), a preallocated
KV cache written in place, and the layers run as one TorchScript function, so that the
operations of a step are called from C++ rather than one by one from Python. The norm, the
rotation and the row-padded product are the training forward's own functions (fused.inv_rms,
fused.rotate, kernels.padded_product), compiled by TorchScript with it.
The numbers are those of the Hugging Face forward (tests compare log-probs and greedy tokens); any
other model type, sliding-window attention or unusual config falls back to the generic path.
"""

import functools
import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F

from .forward import processes_logits
from .fused import inv_rms, llama_like, rotate, rotation_tables
from .kernels import (
    bucket,
    decode_onednn_chosen,
    layout_min_new_tokens,
    mkl_packing_available,
    padded_product,
)
from .lora import has_adapters
from .memory import large_allocations_mapped
from .script import scripted

# the fewest new tokens for which a call lays its weights out for oneDNN (see _prepared_weights):
# None times it on this host (kernels.layout_min_new_tokens); a number fixes it
LAYOUT_MIN_NEW_TOKENS: int | None = None

# Where BLAS runs the decoder's products (kernels.decode_kernel), each decode step's products read the weights
# packed by MKL for the call's row count (see _mkl_packer): in calls with the weights of the previous
# call (the packs are then kept, as oneDNN's layout is), and in calls of at least
# MKL_PACK_MIN_NEW_TOKENS new tokens. False runs them as plain F.linear. Packing anew, with its pages
# faulted in (MKL_PACK_MAX_BYTES), costs about what 16 decode steps of 32 rows save on the reference
# model: whole sampling calls, weights changed before each as in RL, packed / not, 16 new tokens,
# in one process: 0.997x as fast on the reference model, 1.08x on the 30M one.
MKL_PACKED = True
MKL_PACK_MIN_NEW_TOKENS = 16
# The most bytes of packed copies a call makes: the head, then whole layers in order while they fit.
# MKL asks 7-12 MB a matrix and writes about the matrix's size; the packs are mapped for the call
# (memory.large_allocations_mapped) and given back when it ends, so they raise a peak only where
# sampling is it: GRPO's peak RSS rose by 16-20 MB with the reference model's 17 MB of packs and by
# 172 MB with the 119M model's 516 MB (from glibc's heap: 65-73 and 500 MB, TRL's peak being 300 MB
# above rlhfkit's there). The cap keeps a larger model from doubling its weights for a few percent.
MKL_PACK_MAX_BYTES = 2**30

# The most bytes of projection weights (the layers' and the head's) for which a model's prepared
# copies (stacked, laid out for oneDNN, packed by MKL) are kept between calls with unchanged weights:
# kept, they stay held through whatever runs before the next sampling call (a training step after an
# evaluation whose batch had the rollout's rows), so a larger model's are made anew each call.
KEEP_MAX_BYTES = 2**26

# The most bytes of a layer's q, k, v, gate and up weights that a call stacks into [q; k; v] and
# [gate; up] (a copy, held while it samples) so that each group is one product; larger layers run
# them apart and copy nothing (unless laid out for oneDNN, a copy either way). Whole 32 x 16
# sampling calls, weights changed before each as in RL, alternating in one process, same tokens
# and log-probs bit for bit: apart took 1.10x the time of stacked at 2.9 MB a layer (the 4.7M
# model), 1.11x at 11.5 MB (30M), 1.01x at 46 MB (119M, where the stacked copy is 369 MB).
STACK_MAX_BYTES = 2**24


class LeanDecoder:
    """Prefill once, then one token per ``forward`` (or per call of ``step`` with ``state()``, from a
    loop of one's own); attention masks are boolean or additive float (N, 1, 1 or T, L).

    ``new_tokens``: how many tokens the call will decode; the weights are laid out for oneDNN only
    where that many products repay the layout's cost, or where they are kept from an earlier call
    with the same weights (see ``_prepared_weights``). ``decode_rows``: the rows of each decode step
    (``batch`` times the samples per prompt; 0: ``batch``), for which MKL packs the weights.
    """

    def __init__(self, model, batch: int, max_len: int, new_tokens: int, decode_rows: int = 0):
        self.model, self.base = model, getattr(model, model.base_model_prefix)
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        layers = self.base.layers
        dtype = layers[0].self_attn.q_proj.weight.dtype
        self.decode_rows = decode_rows or batch
        self.dtype = dtype
        self.weights, self.biases, self.packs, head_pack = _prepared_weights(
            model, layers, batch, self.decode_rows, dtype, new_tokens)  # per layer: see _layers
        self.intermediate = layers[0].mlp.gate_proj.weight.shape[0]
        norm = layers[0].input_layernorm
        self.eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))
        self.onednn = _onednn_applies(dtype)
        self.embed, self.final_norm = self.base.embed_tokens.weight, self.base.norm.weight
        head = model.get_output_embeddings()
        self.head, self.head_bias, self.head_pack = head.weight, head.bias, head_pack
        # the rotary embedding of every position the call can reach, computed once (applies() admits
        # only rotary types whose values at a position do not depend on the sequence's length)
        cos, sin = self.base.rotary_emb(self.embed[:1], torch.arange(max_len)[None])
        self.cos, self.signed_sin = cos[0], rotation_tables(sin[0])[0]  # (L, D); see fused.rotate
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        # uninitialised: a position is written (prefill, or its decode step) before any step reads it
        self.keys = [torch.empty(shape, dtype=dtype) for _ in layers]
        self.values = [torch.empty(shape, dtype=dtype) for _ in layers]
        self.length = 0

    @staticmethod
    def applies(model) -> bool:
        base = getattr(model, model.base_model_prefix, None)
        return (llama_like(model.config) and model.device.type == "cpu" and hasattr(base, "layers")
                and not length_dependent_rope(model)
                and isinstance(model.get_output_embeddings(), torch.nn.Linear) and not processes_logits(model.config)
                and not has_adapters(model))  # it reads q/k/v weights directly: LoRA layers go the generic way

    def repeat_rows(self, n: int) -> None:
        """Share a prefilled prompt across n samples: row i becomes rows i*n .. i*n+n-1."""
        self.keys = [k.repeat_interleave(n, 0) for k in self.keys]
        self.values = [v.repeat_interleave(n, 0) for v in self.values]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Append ``input_ids`` (N, T) at the cache's end; returns the last position's logits (N, V), fp32."""
        n, t = input_ids.shape
        logits = scripted(step)(input_ids, position_ids, attn_mask, self.length, *self.state(n, t))
        self.length += t
        return logits

    def state(self, n: int, t: int = 1) -> tuple:
        """``step``'s arguments after ``start`` for N rows of T tokens: a loop that runs the decode
        steps itself (the sampler's, in TorchScript) passes them to each step."""
        # oneDNN's products pad the rows to a bucket; MKL's packed ones take the rows packed for (the
        # rest run F.linear on the rows as they are)
        rows, head_rows = (bucket(n * t), bucket(n)) if self.onednn else (self.decode_rows, self.decode_rows)
        return (rows, head_rows, self.onednn, self.embed, self.cos, self.signed_sin, self.weights, self.biases,
                self.packs, self.keys, self.values, self.final_norm, self.head, self.head_bias, self.head_pack,
                self.heads, self.kv_heads, self.head_dim, self.intermediate, self.eps)


# rotary types whose frequencies change with the length of the sequence (transformers'
# dynamic_rope_update): their values cannot be tabled once per call
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def length_dependent_rope(model) -> bool:
    """Whether ``model``'s rotary frequencies change with the sequence's length: a token's
    log-prob then depends on how long the sequence was when it was computed (a decode step's
    against a forward over the finished sequence differ, by up to 1e-2 on Phi-3's longrope)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return getattr(getattr(base, "rotary_emb", None), "rope_type", None) in LENGTH_DEPENDENT_ROPE


# The decoder's step as one TorchScript function: a sampling call runs it once per token on a
# few dozen rows, where the cost of calling each of some 300 small operations from Python was
# most of the time outside the products; TorchScript calls the same operations (the same numbers)
# from C++. It is compiled on first use (under a second), not at import. The sampler runs its
# decode steps from a TorchScript loop of its own (rollout/sampler.py), which compiles it with it.

def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as fused.rms_norm computes it: in fp32, and in fp32 then cast back for other dtypes
    (as the model's module does)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return weight * (x * inv_rms(x, eps))
    h = x.float()
    return weight * (h * inv_rms(h, eps)).to(x.dtype)


def _product(x: torch.Tensor, weight: torch.Tensor, packed: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             rows: int, onednn: bool) -> torch.Tensor:
    """x (M, in) times ``weight``: MKL's packed product where the weight was packed (for ``rows``
    rows; MKL runs plain F.linear on any other count), kernels.product on x padded to ``rows``
    (the weight laid out by _packer or not), or F.linear."""
    if packed is not None:
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
    if not onednn:
        return F.linear(x, weight, bias)
    return padded_product(x, weight, bias, rows)


def _pack(packs: List[torch.Tensor], j: int) -> Optional[torch.Tensor]:
    """The MKL-packed copy of a layer's projection j (0: o, 1: down, then as the weights), if packed."""
    if len(packs) == 0:
        return None
    return packs[j]


def _products(x: torch.Tensor, weights: List[torch.Tensor], packs: List[torch.Tensor], first: int,
              biases: List[Optional[torch.Tensor]], rows: int, onednn: bool) -> torch.Tensor:
    """x times each of ``weights`` (one stacked matrix, or the separate ones; projections ``first``
    on), side by side."""
    if len(weights) == 1:
        return _product(x, weights[0], _pack(packs, first), biases[0], rows, onednn)
    return torch.cat([_product(x, weights[j], _pack(packs, first + j), biases[j], rows, onednn)
                      for j in range(len(weights))], 1)


def _layers(x: torch.Tensor, n: int, cos: torch.Tensor, signed_sin: torch.Tensor, attn_mask: torch.Tensor, start: int,
            rows: int, onednn: bool, weights: List[List[torch.Tensor]], biases: List[List[Optional[torch.Tensor]]],
            packs: List[List[torch.Tensor]], keys: List[torch.Tensor], values: List[torch.Tensor], heads: int,
            kv_heads: int, head_dim: int, intermediate: int, eps: float) -> torch.Tensor:
    """Every layer on x (N * T, H), N rows of T tokens, at cache positions start .. start + T - 1.
    Weights per layer (see _prepared_weights): input norm, post-attention norm, o, down, then
    [q; k; v] and [gate; up] stacked (6 in all) or q, k, v, gate, up apart (9); biases: o, down,
    then those of the rest alike; packs: none, or MKL's packed copies of the projections in the
    biases' order. The residual stream stays 2D, so that a product is one call."""
    t = x.size(0) // n
    end = start + t
    qk_size = (heads + kv_heads) * head_dim
    for i in range(len(weights)):
        w, b, p = weights[i], biases[i], packs[i]
        parts = 1 if len(w) == 6 else 3  # q, k, v stacked or not
        qkv = _products(_norm(x, w[0], eps), w[4:4 + parts], p, 2, b[2:2 + parts], rows, onednn)
        # narrow, not x[:, a:b]: TorchScript runs a slice for every dimension indexed, ":" included
        # (about 60 of a step's 120 views on the reference model)
        qk = rotate(qkv.narrow(1, 0, qk_size).view(n, t, heads + kv_heads, head_dim), cos, signed_sin).transpose(1, 2)
        keys[i].narrow(2, start, t).copy_(qk.narrow(1, heads, kv_heads))
        values[i].narrow(2, start, t).copy_(
            qkv.narrow(1, qk_size, kv_heads * head_dim).view(n, t, kv_heads, head_dim).transpose(1, 2))
        out = F.scaled_dot_product_attention(qk.narrow(1, 0, heads), keys[i].narrow(2, 0, end),
                                             values[i].narrow(2, 0, end), attn_mask=attn_mask,
                                             enable_gqa=kv_heads != heads)
        x.add_(_product(out.transpose(1, 2).reshape(n * t, heads * head_dim), w[2], _pack(p, 0), b[0], rows, onednn))
        h = _norm(x, w[1], eps)
        if parts == 1:
            gate_up = _product(h, w[5], _pack(p, 3), b[3], rows, onednn)
            s = F.silu(gate_up.narrow(1, 0, intermediate)).mul_(gate_up.narrow(1, intermediate, intermediate))
        else:
            s = F.silu(_product(h, w[7], _pack(p, 5), b[5], rows, onednn)).mul_(
                _product(h, w[8], _pack(p, 6), b[6], rows, onednn))
        x.add_(_product(s, w[3], _pack(p, 1), b[1], rows, onednn))
    return x


def step(input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor, start: int, rows: int,
         head_rows: int, onednn: bool, embed: torch.Tensor, cos_table: torch.Tensor, signed_sin_table: torch.Tensor,
         weights: List[List[torch.Tensor]], biases: List[List[Optional[torch.Tensor]]], packs: List[List[torch.Tensor]],
         keys: List[torch.Tensor], values: List[torch.Tensor], final_norm: torch.Tensor, head: torch.Tensor,
         head_bias: Optional[torch.Tensor], head_pack: Optional[torch.Tensor], heads: int, kv_heads: int,
         head_dim: int, intermediate: int, eps: float) -> torch.Tensor:
    """The logits (N, V) after the last of ``input_ids`` (N, T) at ``position_ids``, appended to the cache at ``start``.
    ``attn_mask``: boolean (True: attend), or additive float (0 or -inf), (N, 1, 1 or T, start + T)."""
    n, t = input_ids.size(0), input_ids.size(1)
    x = F.embedding(input_ids.reshape(-1), embed)  # (N * T, H)
    cos, signed_sin = cos_table[position_ids].unsqueeze(2), signed_sin_table[position_ids].unsqueeze(2)  # (N, T, 1, D)
    x = _layers(x, n, cos, signed_sin, attn_mask, start, rows, onednn, weights, biases, packs, keys, values, heads,
                kv_heads, head_dim, intermediate, eps)
    h = _norm(x.view(n, t, -1).select(1, t - 1), final_norm, eps)
    return _product(h, head, head_pack, head_bias, head_rows, onednn).float()


def _onednn_applies(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and decode_onednn_chosen()


def _prepared_weights(model, layers, rows: int, decode_rows: int, dtype: torch.dtype, new_tokens: int):
    """(weights, biases, packs, head_pack): each layer's projection weights as ``_layers`` reads
    them: [q; k; v] and [gate; up] stacked where a layer's are at most ``STACK_MAX_BYTES`` (see
    there), laid out in oneDNN's blocked format where that pays (see ``_packer``); and where BLAS
    runs the products, MKL's packed copies of the head's weight and of each layer's projections
    for ``decode_rows`` rows (see ``_mkl_packer``) up to ``MKL_PACK_MAX_BYTES``, else None and
    empty lists.

    The layout costs 150-390 us a matrix, so it pays within one call only from some number of new
    tokens, a property of the host timed once (``kernels.layout_min_new_tokens``; whole calls broke
    even at 4-8 tokens on an AMD EPYC, near 24 on the earliest host) unless
    ``LAYOUT_MIN_NEW_TOKENS`` fixes it. Across calls it pays whenever the weights have not changed
    since the previous call (evaluation, or any loop that samples repeatedly between updates):
    then the weights are laid out once and kept for the model until they change, where the model's
    projection weights are at most ``KEEP_MAX_BYTES`` (larger ones are prepared anew each call). An
    RL loop changes them before every call, so it never keeps a copy (no memory held during its
    updates).

    A change is seen in the parameters' storage and version counters. Every in-place change through
    PyTorch bumps a tensor's version except the fused optimizer kernels (AdamW(fused=True) among
    them) and writes through ``.data`` (a caller's ``p.data.copy_``, peft's ``merge_and_unload``:
    ``forget_prepared`` drops every kept copy when a run starts), so an optimizer step hook bumps the versions of every torch.optim optimizer's parameters
    after its step (``_bump_versions``). It is registered by the first call: registered only once a
    layout was kept, a fused step between the first two calls went unseen, and the second call of
    every RL run laid out and kept a copy of the weights through the next update (about 500 MB of
    the 119M model's GRPO peak). The decode rows are part of what must not have changed, as MKL's
    packs are made for them.
    """
    _watch_optimizers()
    head = model.get_output_embeddings()
    sources = [p for layer in layers for module in (layer.self_attn, layer.mlp) for p in module.parameters()]
    fingerprint = (decode_rows, tuple((p.data_ptr(), p._version) for p in [*sources, head.weight]))
    kept = _KEPT.get(model)
    if kept is not None and kept[0] == fingerprint and kept[1] is not None:
        return kept[1]
    unchanged = kept is not None and kept[0] == fingerprint  # the same weights as the previous call's
    keep = unchanged and sum(p.nbytes for p in [*sources, head.weight] if p.dim() == 2) <= KEEP_MAX_BYTES
    layout = unchanged or (_onednn_applies(dtype) and new_tokens >= _layout_threshold())
    pack = _packer(rows, dtype, layout)
    mkl_pack = _mkl_packer(decode_rows, dtype) if unchanged or new_tokens >= MKL_PACK_MIN_NEW_TOKENS else None
    a, m = layers[0].self_attn, layers[0].mlp
    stacked = sum(p.weight.nbytes for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)) <= STACK_MAX_BYTES
    weights, biases, packs = [], [], []
    budget = MKL_PACK_MAX_BYTES  # the head's first: one product a step, as each layer's four
    head_pack = mkl_pack(head.weight) if mkl_pack is not None and head.weight.nbytes <= budget else None
    budget -= head.weight.nbytes if head_pack is not None else 0
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        groups = [(a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)] if stacked else \
            [(a.q_proj,), (a.k_proj,), (a.v_proj,), (m.gate_proj,), (m.up_proj,)]
        packed = [pack(a.o_proj.weight, a.o_proj.bias), pack(m.down_proj.weight, m.down_proj.bias)]
        packed += [pack(*_fused(*group)) if len(group) > 1 else pack(group[0].weight, group[0].bias) for group in groups]
        weights.append([layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *(w for w, _ in packed)])
        biases.append([b for _, b in packed])
        layer_bytes = sum(w.nbytes for w, _ in packed)
        fits = mkl_pack is not None and layer_bytes <= budget
        budget -= layer_bytes if fits else 0
        packs.append([mkl_pack(w) for w, _ in packed] if fits else [])
    prepared = (weights, biases, packs, head_pack)
    _KEPT[model] = (fingerprint, prepared if keep else None)
    return prepared


# model -> (fingerprint of its projection weights at its last sampling call, the prepared weights
# kept for it, or None until a call finds the weights unchanged)
_KEPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forget_prepared() -> None:
    """Drop every model's kept prepared weights: each run starts from the weights as they are. A
    caller may have changed a model object between two runs in ways no version counter sees
    (``p.data.copy_(...)``, peft's ``merge_and_unload``, which adds into ``weight.data``), and a
    kept copy would then sample from the old projections (0.21 nats a token off the policy)."""
    _KEPT.clear()


@functools.lru_cache(maxsize=None)
def _watch_optimizers() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_bump_versions)


def _bump_versions(optimizer, args, kwargs) -> None:
    """After any torch.optim step: mark its parameters changed in place, as a non-fused step would."""
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


def _layout_threshold() -> int:
    return LAYOUT_MIN_NEW_TOKENS if LAYOUT_MIN_NEW_TOKENS is not None else layout_min_new_tokens()


def _packer(rows: int, dtype: torch.dtype, layout: bool):
    """(weight, bias) -> the weight in oneDNN's own blocked layout for about ``rows`` rows, where
    oneDNN runs the products and ``layout`` asks for it; else as it is.

    The layout makes each 32-row product 1.1-1.3x faster (the reference model's four shapes, 2
    threads: 3-24 us less per product), but laying out a matrix costs 150-330 us. Whole sampling
    calls of 32 rows, each laying its weights out, in one process, alternating (same tokens and
    log-probs bit for bit): with the layout 1.09x slower at 16 new tokens, 1.13x faster at 64; the
    break-even is near 24 tokens.
    """
    if not _onednn_applies(dtype) or not layout:
        return lambda w, b: (w, b)
    return lambda w, b: (torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows), b)


def _mkl_packer(rows: int, dtype: torch.dtype):
    """weight -> MKL's packed copy of it for products of exactly ``rows`` rows, where BLAS runs the
    decoder's products (``kernels.decode_kernel``), the weights are fp32, MKL's packed product
    exists and ``MKL_PACKED`` is on; else None.

    A decode step's products are skinny (a few dozen rows through each weight), where MKL's
    ``sgemm`` on the weight as it lies runs at about half the rate it reaches on a training
    step's hundreds of rows; on the weight packed once per call (``cblas_sgemm_pack``, through
    ``torch.ops.mkl._mkl_reorder_linear_weight``) the reference model's four shapes at 32 rows took
    1.3-1.6x less time (gate and up 84 against 134 us), and the 30M and 119M models' 1.7-2.3x
    less; the outputs equal, or within float rounding where the inner dimension is 1,024. Packing
    a matrix costs about one packed product (52 us for gate and up), plus the page faults of its
    memory (see ``MKL_PACK_MAX_BYTES``). Whole 32 x 16 sampling calls with the weights unchanged
    (packs kept): 1.2x as fast on the reference model.
    """
    if not (MKL_PACKED and dtype == torch.float32 and not _onednn_applies(dtype) and mkl_packing_available()):
        return None

    def pack(weight: torch.Tensor) -> torch.Tensor:
        with large_allocations_mapped():  # large and short-lived: see MKL_PACK_MAX_BYTES
            return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)

    return pack


def _fused(*projections) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of linear layers that read the same input, stacked: one matmul."""
    weight = torch.cat([p.weight for p in projections])
    if all(p.bias is None for p in projections):
        return weight, None
    return weight, torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0])
                              for p in projections])
