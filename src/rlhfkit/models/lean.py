"""A lean KV-cache decoder for Llama-family models (llama, qwen2, mistral) used by the sampler.

It runs the model's own modules (norms, projections, rotary embedding, MLP) but skips the
generic forward's per-step work: no cache objects, no mask building from scratch, q/k/v
computed by one fused matmul, and a preallocated KV cache written in place. The numbers are
those of the Hugging Face forward (tests compare log-probs and greedy tokens); any other model
type, sliding-window attention or unusual config falls back to the generic path.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .forward import lm_logits
from .kernels import linear
from .lora import has_adapters

SUPPORTED = {"llama", "qwen2", "mistral"}


class LeanDecoder:
    """Prefill once, then one token per ``step``; attention masks are boolean (N, 1, 1 or T, L)."""

    def __init__(self, model, batch: int, max_len: int):
        self.model, self.base = model, getattr(model, model.base_model_prefix)
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        layers = self.base.layers
        self.rope = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.qkv = []
        for layer in layers:  # one fused projection per layer: [q; k; v]
            a = layer.self_attn
            weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
            self.qkv.append((weight, bias))
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        dtype = layers[0].self_attn.q_proj.weight.dtype
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in layers]
        self.length = 0

    @staticmethod
    def applies(model) -> bool:
        cfg = model.config
        return (cfg.model_type in SUPPORTED and not getattr(cfg, "sliding_window", None)
                and not getattr(cfg, "use_sliding_window", False) and model.device.type == "cpu"
                and hasattr(getattr(model, model.base_model_prefix, None), "layers")
                and not has_adapters(model))  # it reads q/k/v weights directly: LoRA layers go the generic way

    def repeat_rows(self, n: int) -> None:
        """Share a prefilled prompt across n samples: row i becomes rows i*n .. i*n+n-1."""
        self.keys = [k.repeat_interleave(n, 0) for k in self.keys]
        self.values = [v.repeat_interleave(n, 0) for v in self.values]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Append ``input_ids`` (N, T) at the cache's end; returns the last position's logits (N, V)."""
        x = self.base.embed_tokens(input_ids)  # (N, T, H)
        cos, sin = self.base.rotary_emb(x, position_ids)
        n, t = input_ids.shape
        start, end = self.length, self.length + t
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.base.layers):
            h = layer.input_layernorm(x)
            qkv = linear(h, *self.qkv[i])
            q = qkv[..., :q_size].view(n, t, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_size: q_size + kv_size].view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size:].view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.keys[i][:n, :, start:end] = k
            self.values[i][:n, :, start:end] = v
            out = F.scaled_dot_product_attention(q, self.keys[i][:n, :, :end], self.values[i][:n, :, :end],
                                                 attn_mask=attn_mask, enable_gqa=self.kv_heads != self.heads)
            x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(n, t, q_size))
            h = layer.post_attention_layernorm(x)
            x = x + layer.mlp(h)
        self.length = end
        return lm_logits(self.model, self.base.norm(x[:, -1])).float()
