"""Learned rewards in GRPO: what they read, and where a step ends."""

import re

import pytest
import torch

from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.data.steps import collate_steps, encode_step_rows
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.reward import load_process_reward_model, load_reward_model, reward_scores, step_logits
from rlhfkit.rollout.reward_models import ProcessRewardModelReward, RewardModelReward, check_renders
from rlhfkit.rollout.sampler import Samples, left_pad
from rlhfkit.tasks.arithmetic import arithmetic_steps


def test_learned_prm_scores_what_training_reads_and_ends_steps_where_the_rule_does(tiny, tmp_path):
    tok = load_tokenizer(tiny["base"])
    prm = load_process_reward_model(tiny["base"], tok)
    prm.config.step_separator = "\n"
    prm.save_pretrained(str(tmp_path / "prm"))  # no tokenizer in the folder: the policy's serves
    reward = ProcessRewardModelReward(str(tmp_path / "prm"), tok)
    prompt, text = "What is 12+34-5?", " 12+34=46\n46-5=40\nAnswer: 40"  # second step wrong, answer wrong
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = read_rows([{"prompt": prompt, "answer": 41}])
    (learned,) = reward.bind(None, rows)([prompt], [text], completion_ids=[ids], tokenizer=tok)
    (rule,) = arithmetic_steps([prompt], [text], completion_ids=[ids], tokenizer=tok)
    # " 12+34=46" ends at character 8, "46-5=40" at 16, "Answer: 40" at 27 (one token per character)
    assert [end for end, _ in learned] == [end for end, _ in rule] == [8, 16, 27]
    training = read_rows([{"prompt": prompt, "completions": text.split("\n"), "labels": [True, False, False]}])
    batch = collate_steps(encode_step_rows(training, tok, "\n", 64)[0], tok.pad_token_id)
    with torch.no_grad():
        probs = torch.sigmoid(step_logits(reward.model, batch.input_ids, batch.attention_mask, batch.step_rows,
                                          batch.step_cols))
    assert [p for _, p in learned] == pytest.approx(probs.tolist(), abs=1e-6)


def _samples(tok, prompts, completions):
    prompt_ids, prompt_mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    width = max(len(c) for c in completions) + 1
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    completion_ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    completion_mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(completion_ids.shape),
                   torch.ones(len(ids), dtype=torch.bool))


def test_reward_model_scores_the_sampled_tokens_or_the_text_for_its_own_tokenizer(tiny, tmp_path):
    from rlhfkit.models.tiny import build_tiny_model
    from rlhfkit.models.tokenizer import build_char_tokenizer

    tok = load_tokenizer(tiny["base"])
    load_reward_model(tiny["base"], tok).save_pretrained(str(tmp_path / "rm"))
    prompts, texts = ["What is 1+2?", "What is 10+20?"], [" 3", " 31"]
    rows = read_rows([{"prompt": p} for p in prompts])
    samples = _samples(tok, prompts, texts)
    same = RewardModelReward(str(tmp_path / "rm"), tok)
    scores = same.bind(samples, rows)(prompts, texts)
    assert not same.retokenise and same.bind(samples, rows).__name__ == "rm"
    assert scores == pytest.approx(reward_scores(same.model, samples.input_ids, samples.attention_mask).tolist(),
                                   abs=1e-6)
    same.retokenise = True  # the text path builds the same sequences for this tokenizer
    assert same.bind(samples, rows)(prompts, texts) == pytest.approx(scores, abs=1e-5)

    other = build_char_tokenizer()  # a tokenizer of its own: one more token, so not the policy's
    other.add_special_tokens({"additional_special_tokens": ["<|step|>"]})
    build_tiny_model(other).save_pretrained(str(tmp_path / "lm2"))
    other.save_pretrained(str(tmp_path / "lm2"))
    rm2 = load_reward_model(tmp_path / "lm2", other)
    rm2.save_pretrained(str(tmp_path / "rm2"))
    other.save_pretrained(str(tmp_path / "rm2"))
    retok = RewardModelReward(str(tmp_path / "rm2"), tok, name="rm_2")
    assert retok.retokenise and len(retok.tokenizer) == len(tok) + 1
    by_hand = [other(p)["input_ids"] + other(t, add_special_tokens=False)["input_ids"] + [other.eos_token_id]
               for p, t in zip(prompts, texts)]
    ids, mask = left_pad(by_hand, other.pad_token_id)
    with torch.no_grad():
        expected = reward_scores(retok.model, ids, mask).tolist()
    assert retok.bind(samples, rows)(prompts, texts) == pytest.approx(expected, abs=1e-6)

    # chat prompts it cannot render (its tokenizer has no template): refused at set-up, naming its folder; it
    # was the first step's reward error, which said to pass tokenizer=PATH (the policy's)
    chat = read_rows([{"prompt": p} for p in prompts] + [{"prompt": [{"role": "user", "content": "What is 1+2?"}]}])
    check_renders(same, chat)  # scores the sampled ids: it renders nothing
    check_renders(retok, chat)
    other.chat_template = None
    other.save_pretrained(str(tmp_path / "rm2"))
    (tmp_path / "rm2" / "chat_template.jinja").unlink(missing_ok=True)
    plain = RewardModelReward(str(tmp_path / "rm2"), tok, name="rm_2")
    check_renders(plain, rows)  # plain-text prompts need no template
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'rm2'))}: this reward model reads the prompts with "
                                        r"its own tokenizer, which has no chat template, .* \(<list>:row 3\)"):
        check_renders(plain, chat)


def test_a_reward_model_with_its_own_tokenizer_reads_a_chat_answer_as_its_training_data_wrote_it(tiny, tmp_path):
    """Its data wrote a chat answer as the template's assistant turn, its turn end and one EOS
    after it (a template that writes none, as Gemma's <end_of_turn>); a finished answer was read
    back as its text and the EOS alone (scores 0.003-0.056 off). It is now written as in training;
    a cut-off answer stays its text."""
    from rlhfkit.data.encode import encode_row_prompt
    from rlhfkit.models.tiny import build_tiny_model
    from rlhfkit.models.tokenizer import build_char_tokenizer

    tok = load_tokenizer(tiny["base"])
    other = build_char_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|step|>"]})
    other.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                           "{% if m['role'] == 'assistant' %}{{ '!' }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    build_tiny_model(other).save_pretrained(str(tmp_path / "lm2"))
    load_reward_model(tmp_path / "lm2", other).save_pretrained(str(tmp_path / "rm2"))
    other.save_pretrained(str(tmp_path / "rm2"))
    rows = read_rows([{"prompt": [{"role": "user", "content": q}]} for q in ("What is 1+2?", "What is 10+20?")])
    texts = [" 3", " 31"]
    samples = _samples(tok, [r.data["prompt"][0]["content"] for r in rows], texts)
    samples.finished = torch.tensor([True, False])
    retok = RewardModelReward(str(tmp_path / "rm2"), tok, name="rm_2")
    by_hand = [encode_row_prompt(other, rows[0]) + other(" 3!", add_special_tokens=False)["input_ids"]
               + [other.eos_token_id], encode_row_prompt(other, rows[1]) + other(" 31", add_special_tokens=False)[
                   "input_ids"]]
    ids, mask = left_pad(by_hand, other.pad_token_id)
    with torch.no_grad():
        expected = reward_scores(retok.model, ids, mask).tolist()
    assert retok.bind(samples, rows)(["", ""], texts) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("readout", ["head", "likelihood"])
def test_an_answer_with_no_step_is_one_wrong_step_for_a_learned_prm(tiny, tmp_path, readout):
    """A likelihood PRM's lowest log-prob over a step of no tokens was +inf: the empty answer got
    probability 1, the best process reward, and GRPO pushed the policy to end at once. An answer
    of nothing but separators had been scored as one step holding the separator."""
    tok = load_tokenizer(tiny["base"])
    prm = load_process_reward_model(tiny["base"], tok, readout=readout)
    prm.config.step_separator, prm.config.step_readout, prm.config.step_logprob_floor = "; ", readout, -3.0
    prm.save_pretrained(str(tmp_path / "prm"))
    reward = ProcessRewardModelReward(str(tmp_path / "prm"), tok)
    prompt, text = "What is 1+2?", " 1+2=3; Answer: 3"
    rows = read_rows([{"prompt": prompt, "answer": 3}] * 4)
    texts = ["", text, "  ", "; ; "]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty, written, blank, separators = reward.bind(None, rows)([prompt] * 4, texts, completion_ids=ids,
                                                                 tokenizer=tok)
    # one wrong step on the last token, as arithmetic_steps
    assert empty == [(0, 0.0)] and blank == [(1, 0.0)] and separators == [(3, 0.0)]
    assert empty == arithmetic_steps([prompt], [""], completion_ids=[ids[0]], tokenizer=tok)[0]
    (alone,) = reward.bind(None, rows[:1])([prompt], [text], completion_ids=ids[1:2], tokenizer=tok)
    assert written == alone and len(written) == 2  # the written answer scored as on its own
    assert reward.bind(None, rows[:1])([prompt], [""], completion_ids=[[]], tokenizer=tok) == [[(0, 0.0)]]


def test_a_reward_folder_is_read_at_its_own_pad_id_whatever_pads_the_batch(tiny, tmp_path):
    """A classifier folder whose config's pad id (eos, the GPT-2 recipe) is not the tokenizer's:
    rlhfkit had put the tokenizer's pad id in its config, reading at the EOS where transformers
    reads the token before it, and GRPO's rm: read the policy's padding as real tokens."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(tiny["base"])
    assert tok.pad_token_id != tok.eos_token_id
    rm = load_reward_model(tiny["base"], tok)
    rm.config.pad_token_id = tok.eos_token_id  # saved so: the folder's own reading point
    rm.save_pretrained(str(tmp_path / "rm"))
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert load_reward_model(tmp_path / "rm", tok).config.pad_token_id == tok.eos_token_id
    prompts, texts = ["What is 1+2?", "What is 10+20?"], [" 3", " 3100"]
    rows = read_rows([{"prompt": p} for p in prompts])
    samples = _samples(tok, prompts, texts)  # padded with the policy's pad id, each finished with EOS
    with torch.no_grad():  # each sequence alone, as plain transformers reads it: before its final EOS
        alone = [plain(input_ids=torch.tensor([tok(p)["input_ids"] + tok(t, add_special_tokens=False)["input_ids"]
                                               + [tok.eos_token_id]])).logits.item() for p, t in zip(prompts, texts)]
    scores = RewardModelReward(str(tmp_path / "rm"), tok).bind(samples, rows)(prompts, texts)
    assert scores == pytest.approx(alone, abs=1e-5)
    assert abs(alone[0] - alone[1]) > 1e-4


def test_learned_rewards_score_micro_batch_by_micro_batch_as_in_one_forward(tiny, tmp_path, monkeypatch):
    """train.micro_batch_size bounds the learned rewards' forwards too (they scored a GRPO step's
    every sample in one): the same scores, in forwards of at most that many rows."""
    import rlhfkit.models.reward as reward_module
    import rlhfkit.rollout.reward_models as rm_module

    tok = load_tokenizer(tiny["base"])
    load_reward_model(tiny["base"], tok).save_pretrained(str(tmp_path / "rm"))
    prm = load_process_reward_model(tiny["base"], tok)
    prm.config.step_separator = "\n"
    prm.save_pretrained(str(tmp_path / "prm"))
    prompts = ["What is 1+2?", "What is 10+20?", "What is 12+34-5?", "What is 7+8?", "What is 2+2?"]
    texts = [" 3", " 31\n30", " 12+34=46\n46-5=40\nAnswer: 40", "", " 15\n\n15"]
    rows, samples = read_rows([{"prompt": p} for p in prompts]), _samples(tok, prompts, texts)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    seen = []
    for module, name in ((reward_module, "_reward_scores"), (rm_module, "step_logits")):  # each forward's rows
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda model, input_ids, *a, _real=real, **k:
                            seen.append(len(input_ids)) or _real(model, input_ids, *a, **k))
    scores, steps = {}, {}
    for chunk in (0, 2):
        seen.clear()
        scores[chunk] = RewardModelReward(str(tmp_path / "rm"), tok, rows_per_forward=chunk).bind(samples, rows)(
            prompts, texts)
        reward = ProcessRewardModelReward(str(tmp_path / "prm"), tok, rows_per_forward=chunk)
        steps[chunk] = reward.bind(None, rows)(prompts, texts, completion_ids=ids, tokenizer=tok)
        assert seen == ([5, 4] if chunk == 0 else [2, 2, 1, 2, 2])  # the PRM: one answer has no step
    assert scores[2] == pytest.approx(scores[0], abs=1e-6)
    assert [e for s in steps[2] for e, _ in s] == [e for s in steps[0] for e, _ in s]
    assert [p for s in steps[2] for _, p in s] == pytest.approx([p for s in steps[0] for _, p in s], abs=1e-6)
