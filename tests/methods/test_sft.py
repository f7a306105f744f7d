import pytest

from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.rollout.evaluate import exact_match
from rlhfkit.train.logging import read_metrics


@pytest.mark.slow
def test_sft_learns_the_task(tiny, sft_run):
    base, tok = load_policy(str(tiny["base"]), None)
    rows = read_rows(tiny["data"] / "sft_eval.jsonl")[:300]
    before = exact_match(base, tok, rows, 8)["accuracy"]
    assert before < 0.05  # a random model answers almost nothing right
    # Stated bar for the suite: >= 0.85 held-out exact match within 2000 steps of batch 128
    # (~60-80 s on 2 cores). The demo trains longer and shows >= 0.9.
    model, _ = load_policy(str(sft_run["out"] / "model"), None)
    after = exact_match(model, tok, rows, 8)["accuracy"]
    assert after >= 0.85, sft_run["evals"]
    assert abs(after - sft_run["accuracy"]) < 1e-9  # the saved model is the one evaluated
    losses = [m["train/loss"] for m in read_metrics(sft_run["out"]) if "train/loss" in m]
    assert losses[-1] < 0.2 * losses[0]
    assert sft_run["snapshot"] is not None and 0.5 <= sft_run["snapshot"]["accuracy"] < after


def test_a_mixture_of_experts_asking_for_its_balancing_loss_is_told_it_is_not_added(tiny, tmp_path, capfd):
    """transformers' own loss adds router_aux_loss_coef x the router's load-balancing loss when
    the config sets output_router_logits, and so do TRL's SFT and DPO; rlhfkit's losses do not,
    and the run says so rather than leave it unsaid."""
    import json

    import transformers as tf
    from helpers import quiet_train

    from rlhfkit.methods.sft import SFTConfig, run_sft
    from rlhfkit.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny["base"]))
    vocab = json.loads((tiny["base"] / "config.json").read_text())["vocab_size"]
    for asks in (True, False):
        folder = tmp_path / f"moe-{asks}"
        config = tf.MixtralConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                  num_experts_per_tok=1, output_router_logits=asks, router_aux_loss_coef=0.02,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        tf.MixtralForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        capfd.readouterr()
        run_sft(SFTConfig(model=str(folder), train_data=str(tiny["data"] / "sft_train.jsonl"), max_length=64,
                          train=quiet_train(tmp_path / f"sft-{asks}", max_steps=1, batch_size=4)))
        said = "do not add its router's load-balancing loss (router_aux_loss_coef=0.02)" in capfd.readouterr().err
        assert said == asks
