"""Sequences longer than a model's positions: refused before any training where the positions are
a learned table (GPT-2 would fail with an index error inside the model, mid-run), said where they
are rotary and would be extrapolated."""

import datasets
import pytest
import transformers
from helpers import quiet_train

from rlhfkit.data.rows import DataError
from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.methods.sft import SFTConfig, run_sft
from rlhfkit.train.config import replace


@pytest.fixture(scope="module")
def gpt2_16(tiny, tmp_path_factory):
    """A GPT-2 folder of 16 learned positions with the tiny default's tokenizer."""
    from methods_setup import gpt2_folder

    return gpt2_folder(tiny, tmp_path_factory.mktemp("gpt2"), n_positions=16)


ROWS = [{"prompt": "What is 12+34? ", "completion": "The answer is 46."}, {"prompt": "1+1=", "completion": "2"}]


def test_rows_past_a_learned_position_table_are_refused_by_row_before_any_step(gpt2_16, tmp_path):
    cfg = SFTConfig(model=gpt2_16, train_data=datasets.Dataset.from_list(ROWS), max_length=64,
                    train=quiet_train(tmp_path / "sft", max_steps=2, batch_size=2))
    with pytest.raises(DataError, match=r"<dataset>:row 1: \d+ tokens, past the model's 16 positions \(n_positions "
                                        r"in its config.json: a learned position table.*lower max_length"):
        run_sft(cfg)
    assert not (tmp_path / "sft" / "metrics.jsonl").exists()  # no step ran


def test_prompts_and_new_tokens_past_a_learned_table_are_refused_and_within_it_train(gpt2_16, tmp_path):
    rows = [{"prompt": "1+1=", "answer": 2}] * 4
    cfg = GRPOConfig(model=gpt2_16, train_data=datasets.Dataset.from_list(rows), group_size=2, prompts_per_step=2,
                     max_new_tokens=20, rewards="contains_answer", beta=0.0,
                     train=quiet_train(tmp_path / "grpo", max_steps=1))
    with pytest.raises(DataError, match=r"<dataset>:row 1: \d+ tokens \+ 20 sampled, past the model's 16 positions"
                                        r".*lower max_new_tokens"):
        run_grpo(cfg)
    assert run_grpo(replace(cfg, max_new_tokens=4, train__out_dir=str(tmp_path / "short")))["steps"] == 1


def test_rows_past_rotary_positions_are_said(tiny, tmp_path, capsys):
    """The tiny default is a Llama of 256 rotary positions: longer rows train, with a warning."""
    rows = [{"prompt": "1+1=" * 80, "completion": "2"}] * 2
    run_sft(SFTConfig(model=str(tiny["base"]), train_data=datasets.Dataset.from_list(rows), max_length=512,
                      train=quiet_train(tmp_path / "sft", max_steps=1, batch_size=2)))
    err = capsys.readouterr().err
    assert "warning: <dataset>:row 1: 322 tokens, past the model's 256 positions (max_position_embeddings); " \
           "its positions are extrapolated" in err


def test_a_roberta_table_after_its_padding_row_holds_two_positions_fewer():
    from rlhfkit.models.load import position_limit

    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        max_position_embeddings=66))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
        max_position_embeddings=64))
    assert position_limit(roberta) == (64, "max_position_embeddings", True)  # 65 tokens: an index error
    assert position_limit(llama) == (64, "max_position_embeddings", False)
