"""The embedded tiny default: a small Llama causal LM from a config, random init, from a seed.

Llama rather than Qwen2: transformers 5 maps a ``qwen2`` folder to ``Qwen2Tokenizer`` whatever
the folder's tokenizer says, which would rebuild our character tokenizer as a byte-level one
(dropping spaces); a Llama folder keeps the tokenizer it ships. Biases on the attention
projections, as Qwen2 has, help this task learn quickly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinySpec:
    # ~130k non-embedding parameters: on 2 CPU cores SFT reaches ~0.9 held-out exact match
    # in about a minute (wider models learn this task more slowly per second).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 256
    tie_embeddings: bool = True


def tiny_config(tokenizer, spec: TinySpec = TinySpec()):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        attention_bias=True,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        use_cache=True,
        torch_dtype="float32",
    )


def build_tiny_model(tokenizer, spec: TinySpec = TinySpec(), seed: int = 0):
    """A freshly initialised LlamaForCausalLM; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(tokenizer, spec))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def write_tiny_default(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0,
                       overwrite: bool = False) -> dict[str, Path]:
    """Build the tiny default's tokenizer, base model and data files under ``out_dir``.

    Layout: ``tokenizer/``, ``base/`` (model and a copy of the tokenizer), ``data/*.jsonl``. A
    folder that already holds files is a FileExistsError unless ``overwrite`` (``rlhfkit tiny --force``).
    """
    from ..tasks.arithmetic_files import write_task_files
    from .tokenizer import save_char_tokenizer, save_tokenizer

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds files (an earlier tiny default, perhaps edited): "
                              "overwrite=True writes over them")
    tokenizer = save_char_tokenizer(out / "tokenizer")
    model = build_tiny_model(tokenizer, spec, seed)
    model.save_pretrained(str(out / "base"))
    save_tokenizer(tokenizer, out / "base")
    write_task_files(out / "data", seed)
    return {"tokenizer": out / "tokenizer", "base": out / "base", "data": out / "data"}
