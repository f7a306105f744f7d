"""Padding-free SFT batches (``SFTConfig.packing``): the same loss and gradients as padded ones."""

import pytest
import torch

from rlhfkit.data.encode import SFTExample, collate_sft, collate_sft_packed, encode_sft
from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.methods.sft import SFTConfig, run_sft, sft_objective
from rlhfkit.train.config import ConfigError, TrainConfig


def test_packing_lays_sequences_end_to_end():
    examples = [SFTExample([1, 2, 3, 4, 5], 2), SFTExample([6, 7], 1), SFTExample([8, 9, 10], 1, (1, 1, 1))]
    batch = collate_sft_packed(examples, pad_id=0, width=6)
    # longest first, first fit in rows of 6: [5 tokens] then [3 + 2 tokens]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [8, 9, 10, 6, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    # targets: after each prompt; a sequence's first token never (the loss mask's 1 there is dropped)
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 1]]
    mask = batch.attention_mask[1, 0].int().tolist()
    assert mask[3] == [0, 0, 0, 1, 0]  # the second sequence's first token sees itself only
    assert mask[4] == [0, 0, 0, 1, 1]
    assert mask[2] == [1, 1, 1, 0, 0]


def test_packed_loss_and_gradients_equal_padded(tiny):
    model, tokenizer = load_policy(str(tiny["base"]), None)
    rows = read_rows(tiny["data"] / "sft_train.jsonl")[:6] + read_rows(tiny["data"] / "multistep_sft_train.jsonl")[:6]
    examples, _ = encode_sft(rows, tokenizer, 64)  # lengths from ~10 to ~30 tokens: padding to remove
    objective = sft_objective()
    results = []
    for batch in (collate_sft(examples, tokenizer.pad_token_id), collate_sft_packed(examples, tokenizer.pad_token_id, 64)):
        model.zero_grad()
        loss, _ = objective.loss(model, batch, objective.counts(batch))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], batch.input_ids.numel()))
    (padded, g_padded, n_padded), (packed, g_packed, n_packed) = results
    assert n_packed < n_padded and batch.input_ids.shape[1] <= 64  # fewer positions, rows within max_length
    assert packed == pytest.approx(padded, rel=1e-5)
    for a, b in zip(g_padded, g_packed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_packing_refused_without_sdpa(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.load import load_tokenizer

    eager = AutoModelForCausalLM.from_pretrained(str(tiny["base"]), attn_implementation="eager")
    cfg = SFTConfig(model=eager, tokenizer=load_tokenizer(str(tiny["base"]), None),
                    train_data=str(tiny["data"] / "sft_train.jsonl"), packing=True,
                    train=TrainConfig(out_dir=str(tmp_path / "out"), max_steps=1, report_to="none"))
    with pytest.raises(ConfigError, match="packing=true needs SDPA attention .* 'eager'"):
        run_sft(cfg)
    assert not (tmp_path / "out" / "model").exists()  # refused before any training
