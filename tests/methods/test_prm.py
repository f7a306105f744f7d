import json

import pytest
import torch
from helpers import quiet_train

from rlhfkit.data.rows import read_rows
from rlhfkit.data.steps import collate_steps, encode_step_rows
from rlhfkit.methods.prm import PRMConfig, run_prm, step_stats
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.reward import load_process_reward_model, step_logits
from rlhfkit.tasks.arithmetic import STEP_SEPARATOR


@pytest.mark.parametrize("num_labels", [1, 2])
def test_scores_are_read_at_the_separators_as_plain_transformers_gives_them(tiny, tmp_path, num_labels):
    from transformers import AutoModelForTokenClassification

    tok = load_tokenizer(tiny["base"])
    load_process_reward_model(tiny["base"], tok, num_labels).save_pretrained(str(tmp_path / "prm"))
    model = load_process_reward_model(tmp_path / "prm", tok).eval()  # the folder's own number of labels
    plain = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "prm")).eval()
    rows = read_rows([{"prompt": "What is 12+34-5?", "completions": [" 12+34=46", "46-5=40", "Answer: 40"],
                       "labels": [True, False, False]},
                      {"prompt": "What is 9+9+1?", "completions": [" 9+9=18"], "labels": [True]}])
    examples, _ = encode_step_rows(rows, tok, "\n", 64)
    newline = tok.convert_tokens_to_ids("\n")
    # by hand: "What is 12+34-5?" is 16 characters, then " 12+34=46" (9) and "\n" at 25; "46-5=40" (7) and
    # "\n" at 33; "Answer: 40" (10) and "\n" at 44
    assert examples[0].positions == [25, 33, 44] and examples[1].positions == [14 + 7]
    assert all(examples[0].input_ids[p] == newline for p in examples[0].positions)
    batch = collate_steps(examples, tok.pad_token_id)
    with torch.no_grad():
        ours = step_logits(model, batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols)
        logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, L)
    theirs = logits[batch.step_rows, batch.step_cols]
    theirs = theirs[:, 0] if num_labels == 1 else theirs[:, 1] - theirs[:, 0]
    assert model.config.num_labels == num_labels and torch.allclose(ours, theirs, atol=1e-5)
    assert (logits[0, 24, -1] - logits[0, 25, -1]).abs() > 1e-4  # the next position would give another score


def test_step_stats_by_hand():
    judged = [[True, False, False], [True, True, True], [False, True], [True, True]]
    labels = [(True, False, False), (True, True, False), (True, True), (True, True)]
    stats = step_stats(judged, labels)
    # 10 steps, 8 judged as labelled (misses: row 1's last, row 2's first) -> 0.8
    # wrong steps: 3 (row 0 x2, row 1 x1); flagged: 3 (row 0 x2, row 2 x1); caught 2 -> P = R = F1 = 2/3
    # first error judged/true: row 0 1/1 yes, row 1 3/2 no, row 2 0/2 no, row 3 2/2 (none) yes -> 0.5
    assert stats["step_accuracy"] == pytest.approx(0.8, abs=1e-9)
    assert stats["wrong_step_precision"] == pytest.approx(2 / 3) and stats["wrong_step_recall"] == pytest.approx(2 / 3)
    assert stats["wrong_step_f1"] == pytest.approx(2 / 3, abs=1e-9)
    assert stats["first_error_accuracy"] == 0.5 and stats["scored_steps"] == 10
    # by index: 0 -> 4 right of 4; 1 -> 3 right, 1 wrong; 2 -> 2 wrong of 2: (4 + 3 + 2) / 10
    assert stats["position_only_accuracy"] == pytest.approx(0.9, abs=1e-9)


def test_micro_batches_give_the_whole_batch_loss(tiny, tmp_path):
    """The step count is global: 2 micro-batches of 4 rows give the loss of one batch of 8."""
    from methods_setup import method_config

    from rlhfkit.train.logging import read_metrics

    losses = {}
    for micro in (0, 4):
        run_prm(method_config("prm", tiny, tmp_path / f"m{micro}", 3, micro_batch_size=micro))
        losses[micro] = [m["train/loss"] for m in read_metrics(tmp_path / f"m{micro}") if "train/loss" in m]
    assert len(losses[0]) == 3 and losses[4] == pytest.approx(losses[0], abs=1e-6)
    assert losses[0][-1] < losses[0][0]  # it trains


def test_last_step_only_trains_the_last_steps_label_alone(tiny, tmp_path):
    """``train_on_last_step_only`` (TRL's): the first step's loss is the BCE of the last steps'
    scores alone, not of every step's."""
    import torch.nn.functional as F

    from rlhfkit.train.logging import read_metrics

    row = {"prompt": "What is 12+34-5?", "completions": [" 12+34=46", "46-5=40", "Answer: 40"],
           "labels": [True, True, False]}
    (tmp_path / "prm.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(8)))  # every batch is known
    cfg = PRMConfig(model=str(tiny["base"]), train_data=str(tmp_path / "prm.jsonl"), max_length=64,
                    train_on_last_step_only=True,
                    train=quiet_train(tmp_path / "run", max_steps=1, batch_size=8, lr=1e-3, schedule="constant"))
    run_prm(cfg)
    logged = next(m["train/loss"] for m in read_metrics(tmp_path / "run") if "train/loss" in m)
    tok = load_tokenizer(tiny["base"])
    model = load_process_reward_model(tiny["base"], tok, 1, seed=cfg.train.seed).eval()
    batch = collate_steps(encode_step_rows(read_rows(str(tmp_path / "prm.jsonl")), tok, "\n", 64)[0], tok.pad_token_id)
    with torch.no_grad():
        logits = step_logits(model, batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols)
    last = logits.view(8, 3)[:, -1]
    assert logged == pytest.approx(F.binary_cross_entropy_with_logits(last, torch.zeros(8)).item(), abs=1e-5)
    every = F.binary_cross_entropy_with_logits(logits, batch.labels).item()
    assert abs(logged - every) > 1e-3  # the test can tell the two apart


@pytest.mark.slow
def test_head_prm_fits_its_training_rows_and_saves_a_token_classifier(tiny, multistep_sft, tmp_path):
    """The head read-out (TRL's form) trains and saves a token classifier. On held-out rows it does not
    get past what the step position alone gives on this 2-layer model (0.66-0.74 against 0.673,
    README and issue #14), so the bar here is modest: its training loss ends below that of the best
    constant judge (the training rows' share of right steps), i.e. it learns at least the
    position prior (measured: 0.60 against 0.637)."""
    import math

    from rlhfkit.train.logging import read_metrics

    data = tiny["data"]
    cfg = PRMConfig(model=str(multistep_sft), train_data=str(data / "prm_train.jsonl"),
                    eval_data=str(data / "prm_eval.jsonl"), max_length=64, eval_limit=300, step_separator=STEP_SEPARATOR,
                    train=quiet_train(tmp_path / "prm", max_steps=500, batch_size=32, lr=2e-3, warmup_steps=20,
                                      eval_every=0, log_every=10))
    run_prm(cfg)
    labels = [y for r in read_rows(data / "prm_train.jsonl") for y in r.data["labels"]]
    p = sum(labels) / len(labels)
    prior = -(p * math.log(p) + (1 - p) * math.log(1 - p))  # BCE of the best constant judge
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "prm") if "train/loss" in m]
    assert sum(losses[-20:]) / 20 < prior, (losses[-20:], prior)
    config = json.loads((tmp_path / "prm" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and config["step_separator"] == STEP_SEPARATOR


def test_likelihood_readout_is_the_lowest_token_logprob_of_each_step(tiny, tmp_path):
    """``readout=likelihood``: step j's logit is min over its own tokens (not the separator) of
    log p(x_t | x_<t) from the causal LM, minus the floor; checked against a loop over the LM's logits."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny["base"])
    model = load_process_reward_model(tiny["base"], tok, readout="likelihood").eval()
    model.config.step_readout, model.config.step_logprob_floor = "likelihood", -3.0
    plain = AutoModelForCausalLM.from_pretrained(str(tiny["base"])).eval()
    rows = read_rows([{"prompt": "What is 12+34-5?", "completions": [" 12+34=46", "46-5=40", "Answer: 40"],
                       "labels": [True, False, False]},
                      {"prompt": "What is 9+9+1?", "completions": [" 9+9=18"], "labels": [True]}])
    examples, _ = encode_step_rows(rows, tok, "\n", 64)
    # by hand: the prompt is 16 tokens, " 12+34=46" tokens 16..24, "\n" 25, "46-5=40" 26..32, "\n" 33, ...
    assert examples[0].spans == ((16, 25), (26, 33), (34, 44)) and examples[1].spans == ((14, 21),)
    batch = collate_steps(examples, tok.pad_token_id)
    with torch.no_grad():
        ours = step_logits(model, batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols,
                           batch.step_spans)
        expected = []
        for e in examples:
            logp = torch.log_softmax(plain(input_ids=torch.tensor([e.input_ids])).logits[0], -1)
            for start, end in e.spans:
                expected.append(min(logp[t - 1, e.input_ids[t]].item() for t in range(start, end)) + 3.0)
    assert ours.tolist() == pytest.approx(expected, abs=1e-4)


def test_likelihood_prm_trains_saves_and_scores_in_grpo(tiny, tmp_path):
    from methods_setup import method_config

    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.rollout.reward_models import ProcessRewardModelReward

    base = method_config("prm", tiny, tmp_path / "prm", 3)
    run_prm(PRMConfig(**{**base.__dict__, "readout": "likelihood"}))
    folder = tmp_path / "prm" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["step_readout"] == "likelihood"
    GRPOConfig(process_reward=f"prm:{folder}")  # accepted as a process reward model
    from rlhfkit.train.config import ConfigError

    with pytest.raises(ConfigError, match="is a PRM with the likelihood read-out .no score head.; readout=likelihood"):
        PRMConfig(model=str(folder), train_data="steps.jsonl")  # readout=head would have failed after the data
    tok = load_tokenizer(tiny["base"])
    prompt, text = "What is 12+34-5?", " 12+34=46\n46-5=40\nAnswer: 40"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (scored,) = ProcessRewardModelReward(str(folder), tok).bind(None, read_rows([{"prompt": prompt}]))(
        [prompt], [text], completion_ids=[ids], tokenizer=tok)
    assert [end for end, _ in scored] == [8, 16, 27] and all(0 < p < 1 for _, p in scored)
    # each probability by hand from plain transformers: sigmoid(lowest log p of the step's tokens - floor)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    separator, floor = config["step_separator"], config["step_logprob_floor"]
    ids, spans = tok(prompt)["input_ids"], []
    for step in text.split(separator):
        step_ids = tok(step, add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(step_ids)))
        ids += step_ids + tok(separator, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = plain(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    token_logp = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]  # token t predicted at t - 1
    expected = [torch.sigmoid(torch.tensor(min(token_logp[s - 1: e - 1]) - floor)).item() for s, e in spans]
    assert [p for _, p in scored] == pytest.approx(expected, abs=1e-5)
    card = (folder / "README.md").read_text()  # the model card loads it as the causal LM it is
    assert "AutoModelForCausalLM.from_pretrained" in card and "method: a process reward model" in card
    run_prm(method_config("prm", tiny, tmp_path / "head", 1))  # the head read-out: a token classifier
    assert "AutoModelForTokenClassification.from_pretrained" in (tmp_path / "head" / "model" / "README.md").read_text()


@pytest.mark.slow
def test_likelihood_prm_reaches_the_step_accuracy_bar(tiny, multistep_sft, tmp_path):
    """Issue #14's bar, >= 0.9 held-out step accuracy, with the likelihood read-out from the multi-step
    SFT model (measured 0.985 after 1000 steps, 0.976 before any: the demo's SFT model already
    expects the right token where a wrong step departs from it)."""
    data = tiny["data"]
    cfg = PRMConfig(model=str(multistep_sft), train_data=str(data / "prm_train.jsonl"),
                    eval_data=str(data / "prm_eval.jsonl"), max_length=64, eval_limit=300, readout="likelihood",
                    step_separator=STEP_SEPARATOR,
                    train=quiet_train(tmp_path / "prm", max_steps=200, batch_size=32, lr=3e-4, warmup_steps=20,
                                      eval_every=0, log_every=10))
    summary = run_prm(cfg)
    assert summary["step_accuracy"] >= 0.9 and summary["position_only_accuracy"] < 0.75, summary
    assert summary["wrong_step_f1"] >= 0.85, summary


def test_an_architecture_without_a_token_classifier_is_one_line(tiny, tmp_path):
    """OPT has no ...ForTokenClassification: a one-line ModelLoadError naming the folder, as the RM's
    loader gives, not transformers' traceback."""
    import transformers

    from rlhfkit.models.load import ModelLoadError, load_tokenizer
    from rlhfkit.models.reward import load_process_reward_model

    tok = load_tokenizer(str(tiny["base"]))
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32, pad_token_id=tok.pad_token_id)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelLoadError, match=f"cannot load the model in {tmp_path / 'opt'}: ValueError: "
                                             "Unrecognized configuration class") as e:
        load_process_reward_model(tmp_path / "opt", tok)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("readout, merge", [("head", False), ("likelihood", False), ("likelihood", True)])
def test_a_lora_prm_keeps_its_step_settings_beside_the_adapter(tiny, tmp_path, readout, merge):
    """A LoRA adapter folder has no config.json: the separator and read-out had been lost, so
    `rlhfkit eval` and GRPO's prm:PATH split the steps at "\\n" (and refused a likelihood adapter)."""
    from methods_setup import method_config

    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.methods.prm import step_metrics
    from rlhfkit.models.reward import prm_settings
    from rlhfkit.rollout.reward_models import ProcessRewardModelReward
    from rlhfkit.train.config import LoraConfig

    base = method_config("prm", tiny, tmp_path / "prm", 2)
    cfg = PRMConfig(**{**base.__dict__, "readout": readout, "lora": LoraConfig(r=4, alpha=8, merge=merge),
                       "step_separator": STEP_SEPARATOR, "eval_data": base.train_data, "eval_limit": 16})
    result = run_prm(cfg)
    folder = tmp_path / "prm" / "model" / ("adapter" if merge else "")  # merged: the model, its adapter beside
    assert not (folder / "config.json").exists() and STEP_SEPARATOR != "\n"
    assert prm_settings(folder)["step_separator"] == STEP_SEPARATOR
    assert (prm_settings(folder).get("step_readout") == "likelihood") == (readout == "likelihood")
    GRPOConfig(process_reward=f"prm:{folder}")  # accepted as a process reward model
    tok = load_tokenizer(tiny["base"])
    assert ProcessRewardModelReward(str(folder), tok).separator == STEP_SEPARATOR
    model = load_process_reward_model(folder, tok)  # as `rlhfkit eval` loads it: the run's own final eval
    examples, _ = encode_step_rows(read_rows(base.train_data)[:16], tok, model.config.step_separator, 64)
    assert step_metrics(model, examples, tok.pad_token_id)["step_accuracy"] == pytest.approx(
        result["step_accuracy"], abs=1e-6)
