"""TRL's dataset formats, standard and conversational, per method; refused formats name the method
that takes them; datasets objects, saved folders and Hub names as inputs (issue #15, items 2-4)."""

import re

import datasets
import pytest

from rlhfkit.data.encode import (
    answer_ids,
    collate_sft,
    encode_row_prompt,
    encode_sft,
    prompt_text,
    sft_pieces,
)
from rlhfkit.data.formats import user_prompt
from rlhfkit.data.prefs import encode_rankings
from rlhfkit.data.rows import DataError, Row, read_rows
from rlhfkit.models.tokenizer import build_char_tokenizer
from rlhfkit.rollout.evaluate import row_prompt_ids

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
USER, ASSISTANT = ({"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": " 3"})


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()  # template: <|user|>...<|assistant|>...<eos>


@pytest.fixture(scope="module")
def chatml():
    """A Qwen-instruct-like tokenizer: turns end with <|im_end|>, which is its EOS."""
    t = build_char_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token, t.chat_template = "<|im_end|>", CHATML
    return t


def _rows(*dicts):
    return [Row(f"d.jsonl:{i + 1}", d) for i, d in enumerate(dicts)]


def _trained(tok, example) -> str:
    batch = collate_sft([example], tok.pad_token_id)
    return tok.decode([t for t, m in zip(batch.input_ids[0].tolist(), batch.completion_mask[0].tolist()) if m])


# --- SFT: language modeling, prompt-completion, and their conversational forms -----------------

def test_sft_language_modeling_text_trains_the_whole_text(tok):
    (e,), _ = encode_sft(_rows({"text": "What is 1+2? 3"}), tok, 64)
    assert tok.decode(e.input_ids) == "What is 1+2? 3<eos>" and e.prompt_len == 0


def test_sft_multi_turn_messages_train_every_assistant_turn_to_the_templates_end(chatml):
    messages = [{"role": "system", "content": "Be brief."}, USER, ASSISTANT,
                {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": " 4"}]
    (e,), _ = encode_sft(_rows({"messages": messages}), chatml, 256)
    assert chatml.decode(e.input_ids) == chatml.apply_chat_template(messages, tokenize=False).rstrip("\n")
    # both answers, each through its <|im_end|>; no bare EOS appended, no "\n" or user turn trained
    assert _trained(chatml, e) == " 3<|im_end|> 4<|im_end|>"


def test_sft_prompt_completion_standard_and_conversational(tok, chatml):
    (plain,), _ = encode_sft(_rows({"prompt": "What is 1+2?", "completion": " 3"}), tok, 64)
    assert _trained(tok, plain) == " 3<eos>"
    (chat,), _ = encode_sft(_rows({"prompt": [USER], "completion": [ASSISTANT]}), chatml, 128)
    prompt = chatml.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert chatml.decode(chat.input_ids[: chat.prompt_len]) == prompt  # no dummy assistant turn
    assert _trained(chatml, chat) == " 3<|im_end|>"


def test_a_template_that_writes_no_end_token_gets_eos(tok):
    t = build_char_tokenizer()
    t.chat_template = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}" \
                      "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    (e,), _ = encode_sft(_rows({"messages": [USER, ASSISTANT]}), t, 64)
    assert _trained(t, e) == " 3<eos>"


def test_a_template_whose_turns_end_without_eos_gets_one_eos_after_the_last_turn_only(tok):
    """TRL renders the conversation and ends it with one EOS where the template writes none; an EOS
    after every assistant turn would put in the middle what the template never writes there."""
    t = build_char_tokenizer()
    t.chat_template = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}" \
                      "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    messages = [USER, ASSISTANT, {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": " 4"}]
    (e,), _ = encode_sft(_rows({"messages": messages}), t, 128)
    assert t.decode(e.input_ids) == t.apply_chat_template(messages, tokenize=False).rstrip("\n") + "<eos>"
    assert _trained(t, e) == " 3 4<eos>"


@pytest.mark.parametrize("row, message", [
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": " "}]}, "field 'completion[0].content' is empty"),
    ({"messages": [USER, {"role": "assitant", "content": " 3"}]},
     "field 'messages' has no assistant turn after the first message to train on (roles: 'user', 'assitant')"),
    ({"text": "junk", "prompt": "What is 1+2?", "completion": " 3"},
     "field 'text' beside 'prompt' and 'completion': a row holds one format"),
    ({"text": "What is 1+2? 3", "messages": [USER, ASSISTANT]}, "field 'messages' beside 'text'"),
])
def test_sft_refuses_what_it_would_train_as_eos_alone_or_leave_unread(tok, row, message):
    with pytest.raises(DataError, match="^d.jsonl:1: " + re.escape(message)):
        encode_sft(_rows(row), tok, 64)


def test_an_over_long_answer_and_a_text_prompt_beside_chat_answers_name_their_fields(tok):
    row = {"prompt": "What is 1+2?", "chosen": " 3", "rejected": " 4" * 40}
    with pytest.raises(DataError, match=r"^d.jsonl:1: \d+ tokens \(prompt \d+ \+ rejected 81\) exceed max_length=64"):
        encode_rankings(_rows(row), tok, 64, method="dpo")
    mixed = {"prompt": "What is 1+2?", "chosen": [USER, ASSISTANT], "rejected": " 4"}
    with pytest.raises(DataError, match=r"^d.jsonl:2: field 'prompt' is plain text and 'chosen' holds chat messages"):
        encode_rankings(_rows({"prompt": "What is 1+2?", "chosen": " 3", "rejected": " 4"}, mixed), tok, 64)


def test_turns_after_the_last_answer_are_context_not_dropped(tok):
    """A conversation ending with a tool's reply or a user's turn: TRL renders it, and its
    assistant-only loss leaves those turns untrained; they were dropped from the row."""
    messages = [USER, ASSISTANT, {"role": "user", "content": "And?"}]
    (e,), _ = encode_sft(_rows({"messages": messages}), tok, 128)
    assert tok.decode(e.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert _trained(tok, e) == " 3<eos>"
    (every,), _ = encode_sft(_rows({"messages": messages}), tok, 128, completion_only=False)
    assert _trained(tok, every) == tok.decode(every.input_ids[1:])  # every token but the first, the trailing turn too


def test_an_empty_chat_answer_is_refused_in_pairs_as_in_plain_text(tok):
    row = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": ""}]}
    with pytest.raises(DataError, match=r"^d.jsonl:1: field 'rejected\[0\].content' is empty"):
        encode_rankings(_rows(row), tok, 64, method="dpo")


# --- RM and DPO: preference (explicit, implicit), rankings, conversational -----------------------

PREFERENCE_ROWS = {
    "preference": ({"prompt": "What is 1+2?", "chosen": " 3", "rejected": " 4"}, "What is 1+2?", [" 3", " 4"]),
    "implicit_preference": ({"chosen": "What is 1+2? 3", "rejected": "What is 1+2? 4"}, "What is 1+2?", [" 3", " 4"]),
    "ranking": ({"prompt": "What is 1+2?", "completions": [" 3", " 4", " 5"]}, "What is 1+2?", [" 3", " 4", " 5"]),
    "conversational_preference": ({"prompt": [USER], "chosen": [ASSISTANT],
                                   "rejected": [{"role": "assistant", "content": " 4"}]},
                                  "<|user|>What is 1+2?<|assistant|>", [" 3<eos>", " 4<eos>"]),
    "conversational_implicit_preference": ({"chosen": [USER, ASSISTANT],
                                            "rejected": [USER, {"role": "assistant", "content": " 4"}]},
                                           "<|user|>What is 1+2?<|assistant|>", [" 3<eos>", " 4<eos>"]),
}


@pytest.mark.parametrize("method", ["rm", "dpo"])
@pytest.mark.parametrize("fmt", list(PREFERENCE_ROWS))
def test_preference_formats_for_rm_and_dpo(tok, method, fmt):
    row, prompt, answers = PREFERENCE_ROWS[fmt]
    (e,), _ = encode_rankings(_rows(row), tok, 64, method=method)
    assert tok.decode(e.prompt_ids) == prompt
    assert [tok.decode(c) for c in e.completion_ids] == [a if a.endswith("<eos>") else a + "<eos>" for a in answers]
    assert e.ranks == list(range(len(answers)))


# --- GRPO and PPO: prompt-only, standard and conversational ---------------------------------------

def test_prompt_only_standard_and_conversational(tok):
    rows = _rows({"prompt": "What is 1+2?", "answer": 3}, {"prompt": [USER], "answer": 3})
    ids = row_prompt_ids(tok, rows)
    assert [tok.decode(i) for i in ids] == ["What is 1+2?", "<|user|>What is 1+2?<|assistant|>"]
    assert user_prompt(rows[0]) == "What is 1+2?" and user_prompt(rows[1]) == [USER]  # as the user wrote it
    assert user_prompt(_rows({"messages": [USER, ASSISTANT]})[0]) == [USER]


# --- refused formats ------------------------------------------------------------------------------

REFUSED = [
    ("sft", {"prompt": "p", "completion": " 4", "label": False},
     "d.jsonl:1: an unpaired-preference (prompt, completion, label) row is not sft data; that format is for kto (for sft keep "
     "the rows whose label is true and drop 'label')"),
    ("sft", {"prompt": "p", "chosen": "a", "rejected": "b"},
     "d.jsonl:1: a preference (prompt, chosen, rejected) row is not sft data; that format is for rm, dpo (cpo, orpo) and kto"),
    ("sft", {"prompt": "p", "answer": 4},
     "d.jsonl:1: missing field 'completion' (fields present: answer, prompt); a prompt-only row is grpo, rloo, ppo, online_dpo and distill data"),
    ("rm", {"prompt": "p", "completions": ["a", "b"], "labels": [True, False]},
     "a stepwise-supervision (prompt, completions, labels) row is not rm data; that format is for prm (a "
     "process reward model)"),
    ("dpo", {"prompt": "p", "completions": ["a", "b"], "labels": [True, False]},
     "a stepwise-supervision (prompt, completions, labels) row is not dpo data; that format is for prm (a "
     "process reward model)"),
    ("dpo", {"prompt": "p", "completion": "a", "label": True},
     "an unpaired-preference (prompt, completion, label) row is not dpo data; that format is for kto"),
]


@pytest.mark.parametrize("method,row,message", REFUSED)
def test_refused_formats_name_the_method_that_takes_them(tok, method, row, message):
    with pytest.raises(DataError) as err:
        if method == "sft":
            encode_sft(_rows(row), tok, 64)
        else:
            encode_rankings(_rows(row), tok, 64, method=method)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_chat_data_without_a_chat_template_is_one_line_naming_the_field(tok):
    t = build_char_tokenizer()
    t.chat_template = None
    for row, field in (({"prompt": [USER], "completion": [ASSISTANT]}, "prompt"), ({"messages": [USER, ASSISTANT]},
                                                                                     "messages")):
        with pytest.raises(DataError, match=f"d.jsonl:1: field '{field}' holds chat messages but the tokenizer "
                                            "has no chat template"):
            encode_sft(_rows(row), t, 64)
    with pytest.raises(DataError, match="field 'prompt' holds chat messages"):
        prompt_text(_rows({"prompt": [USER]})[0], t)


# --- inputs: datasets objects, saved folders, Hub names -------------------------------------------

def test_datasets_objects_and_saved_folders(tmp_path, tok):
    train = datasets.Dataset.from_list([{"prompt": "What is 1+2?", "completion": " 3"}] * 3)
    test = datasets.Dataset.from_list([{"prompt": "What is 2+2?", "completion": " 4"}])
    both = datasets.DatasetDict({"train": train, "test": test})
    assert len(read_rows(train)) == 3 and len(read_rows(datasets.DatasetDict({"train": train}))) == 3
    with pytest.raises(DataError, match=r"a DatasetDict with splits test, train; name one"):
        read_rows(both)
    train.save_to_disk(str(tmp_path / "one"))
    both.save_to_disk(str(tmp_path / "both"))
    assert [r.data for r in read_rows(tmp_path / "one")] == list(train)
    rows = read_rows(f"{tmp_path / 'both'}:test")
    assert [r.data for r in rows] == list(test) and rows[0].where == f"{tmp_path / 'both'}:test:row 1"
    with pytest.raises(DataError, match="no split 'dev'; the splits are test, train"):
        read_rows(f"{tmp_path / 'both'}:dev")
    with pytest.raises(DataError, match="splits test, train; name one"):
        read_rows(tmp_path / "both")


def test_a_hub_name_says_it_needs_the_network(tmp_path):
    with pytest.raises(DataError, match="^trl-lib/ultrafeedback: a Hub dataset name needs the network; pass a "
                                        "local file or a saved dataset folder"):
        read_rows("trl-lib/ultrafeedback")
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "What is 1+2?", "completion": [ASSISTANT]},
     "d.jsonl:1: field 'completion' holds chat messages but the prompt is plain text"),
    ({"prompt": "What is 1+2?", "chosen": [ASSISTANT], "rejected": [ASSISTANT | {"content": " 4"}]},
     "d.jsonl:1: field 'chosen' holds chat messages but the prompt is plain text"),
    ({"chosen": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT],
      "rejected": [{"role": "system", "content": "Be kind."}, USER, ASSISTANT | {"content": " 4"}]},
     "d.jsonl:1: fields 'chosen' and 'rejected' share no leading message"),
    ({"prompt": "Q", "completions": ["a", "b"], "ranks": [False, True]}, "d.jsonl:1: field 'ranks' must be"),
])
def test_mixed_or_promptless_chat_rows_fail_with_the_row_and_field(tok, row, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        if "completion" in row:
            encode_sft(_rows(row), tok, 128)
        else:
            encode_rankings(_rows(row), tok, 128)


def test_ranks_none_from_a_table_column_means_no_ties(tok):
    """parquet and datasets give every row every column: a row without ties holds ``ranks: None``."""
    [example], _ = encode_rankings(_rows({"prompt": "Q", "completions": ["a", "b", "c"], "ranks": None}), tok, 128)
    assert example.ranks == [0, 1, 2]


def test_a_chat_prompt_gets_one_bos_in_every_method(tok):
    """A Llama-like tokenizer adds BOS to plain text and its template writes one too: a chat
    prompt (in ``prompt``, TRL's conversational form, or in ``messages``) is encoded with the
    template's BOS alone wherever it is read: SFT, RM/DPO, sampling and held-out eval, rewards."""
    from tokenizers import processors

    import rlhfkit.rollout.reward_models as reward_models
    from rlhfkit.data.encode import encode_row_prompt

    t = build_char_tokenizer()
    t.add_special_tokens({"bos_token": "<s>"})
    t._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    t.chat_template = "{{ bos_token }}" + t.chat_template
    assert t("hi")["input_ids"][0] == t.bos_token_id  # plain text: one BOS from the tokenizer
    sft, pair, prompt_only, messages = _rows({"prompt": [USER], "completion": [ASSISTANT]},
                                            {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT | {"content": " 4"}]},
                                            {"prompt": [USER]}, {"messages": [USER]})
    trained = encode_sft([sft], t, 128)[0][0]
    expected = trained.input_ids[:trained.prompt_len]
    assert expected.count(t.bos_token_id) == 1 and expected[0] == t.bos_token_id
    assert encode_rankings([pair], t, 128)[0][0].prompt_ids == expected
    assert row_prompt_ids(t, [prompt_only, messages]) == [expected, expected]  # GRPO, PPO, held-out eval
    assert reward_models.encode_row_prompt is encode_row_prompt  # rm:/prm: rewards read prompts through it
    assert encode_row_prompt(t, Row("p.jsonl:1", {"prompt": "What is 1+2?"}))[0] == t.bos_token_id  # plain: one BOS


TOOLS_TEMPLATE = ("{% if tools %}{{ '<|system|>tools:' }}{% for t in tools %}{{ t['function']['name'] }}{% endfor %}"
                  "{% endif %}{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m.get('tool_calls') %}"
                  "{{ 'call ' + m['tool_calls'][0]['function']['name'] }}{% else %}{{ m['content'] }}{% endif %}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def test_tool_calling_rows_render_their_tools_and_train_the_calls(tok):
    """TRL's tool-calling form: the row's ``tools`` go to the chat template (as a list or a JSON
    string), an assistant turn may be a ``tool_calls`` message with no content, and both
    assistant turns (the call and the answer) are trained, the tool's reply is context."""
    import json as json_module

    t = build_char_tokenizer()
    t.chat_template = TOOLS_TEMPLATE
    tools = [{"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}]
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "clock", "arguments": {}}}]}
    messages = [{"role": "user", "content": "time?"}, call, {"role": "tool", "content": "12:00"},
                {"role": "assistant", "content": "noon"}]
    for given in (tools, json_module.dumps(tools)):
        (example,), _ = encode_sft(_rows({"messages": messages, "tools": given}), t, 256)
        assert t.decode(example.input_ids) == ("<|system|>tools:clock<|user|>time?<|assistant|>call clock<eos>"
                                                "<|tool|>12:00<|assistant|>noon<eos>")
        assert _trained(t, example) == "call clock<eos>noon<eos>"
    with pytest.raises(DataError, match="d.jsonl:1: field 'tools' must be a list of function schemas"):
        encode_sft(_rows({"messages": messages, "tools": 3}), t, 256)


def test_a_users_message_as_the_answer_and_a_templateless_implicit_chat_pair_are_named(tok, chatml):
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'completion' holds a 'user' message; an answer is the "
                                        r"assistant's"):
        encode_sft(_rows({"prompt": [USER], "completion": [{"role": "user", "content": "3"}]}), chatml, 64)
    pair = {"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": " 4"}]}
    plain = build_char_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'chosen' holds chat messages but the tokenizer has no chat"):
        encode_rankings(_rows(pair), plain, 64)


def test_chat_messages_in_text_are_told_to_go_in_messages(chatml):
    """A conversation under 'text' was refused as "holds chat messages but the prompt is plain
    text", of a row that has no prompt."""
    row = Row("t.jsonl:1", {"text": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'text' must be a string; a conversation of chat messages "
                                        r"goes in a field named 'messages'"):
        sft_pieces(row, chatml)


def test_a_ranking_of_chat_answers_encodes_as_the_pairs_of_its_answers(chatml):
    """The formats are "each standard or conversational", but a ranking's answers as chat turns were
    refused ("field 'completions[0]' must be a string, got list")."""
    turns = [[{"role": "assistant", "content": f" {n}"}] for n in (4, 5, 6)]
    ranking = {"prompt": [USER], "completions": turns}
    pair = {"prompt": [USER], "chosen": turns[0], "rejected": turns[2]}
    (ranked,), _ = encode_rankings(_rows(ranking), chatml, 64)
    (paired,), _ = encode_rankings(_rows(pair), chatml, 64)
    assert ranked.prompt_ids == paired.prompt_ids and ranked.ranks == [0, 1, 2]
    assert [ranked.completion_ids[0], ranked.completion_ids[2]] == paired.completion_ids
    for bad, said in (({"completions": [turns[0], " 5"]}, r"field 'completions' mixes text and chat messages"),
                      ({"completions": [turns[0], turns[0]]}, r"field 'completions' lists the answer of 'completions\[0\]' more than once"),
                      ({"completions": [turns[0], [{"role": "assistant"}]]}, r"field 'completions\[1\]\[0\]' must have "
                                                                             r"string 'role' and 'content'")):
        with pytest.raises(DataError, match=r"d.jsonl:1: " + said):
            encode_rankings(_rows({**ranking, **bad}), chatml, 64)


def test_a_text_prompt_beside_whole_conversations_is_their_shared_start_as_in_trl(chatml):
    """UltraFeedback-binarized's layout: ``prompt`` as text, ``chosen`` and ``rejected`` as whole
    conversations (and extra fields). TRL then takes the conversations' shared messages as the
    prompt; it was refused ("holds chat messages but the prompt is plain text")."""
    wrong = {"role": "assistant", "content": " 4"}
    ufb = {"prompt": USER["content"], "chosen": [USER, ASSISTANT], "rejected": [USER, wrong],
           "messages": [USER, ASSISTANT], "score_chosen": 9.0, "score_rejected": 2.0}
    implicit = {"chosen": [USER, ASSISTANT], "rejected": [USER, wrong]}
    assert encode_rankings(_rows(ufb), chatml, 64)[0] == encode_rankings(_rows(implicit), chatml, 64)[0]
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt' is plain text beside 'chosen' and 'rejected' as "
                                        r"whole conversations.*not the 'prompt' text"):
        encode_rankings(_rows({**ufb, "prompt": "another question"}), chatml, 64)


def test_a_chat_template_that_raises_names_the_row_and_field(tok):
    """A template's own error (a Mistral-style "roles must alternate", or a key it reads that a
    message lacks) was a bare Jinja traceback with no file or row."""
    strict = build_char_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    row = {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]}
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'messages': the tokenizer's chat template cannot render "
                                        r"these messages \(TemplateError: Conversation roles must alternate"):
        encode_sft(_rows(row), strict, 64)


def test_a_prompt_ending_with_the_assistants_start_is_continued_by_the_answer(tok, chatml):
    """A prefill ("The answer is") was closed and followed by a new assistant turn, so the model
    sampled, and was trained, after "...The answer is<eos><|assistant|>"; it is continued, as TRL
    renders a prompt whose last message is the assistant's (continue_final_message)."""
    prefill = [USER, {"role": "assistant", "content": "The answer is"}]
    row = _rows({"prompt": prefill, "completion": [{"role": "assistant", "content": " 3"}]})
    assert prompt_text(row[0], tok) == "<|user|>What is 1+2?<|assistant|>The answer is"
    example = encode_sft(row, tok, 64)[0][0]
    assert tok.decode(example.input_ids) == "<|user|>What is 1+2?<|assistant|>The answer is 3<eos>"
    assert _trained(tok, example) == " 3<eos>"
    example = encode_sft(row, chatml, 64)[0][0]
    assert chatml.decode(example.input_ids).endswith("<|im_start|>assistant\nThe answer is 3<|im_end|>")
    assert prompt_text(_rows({"prompt": [USER]})[0], tok) == "<|user|>What is 1+2?<|assistant|>"  # no prefill


def test_a_generation_prompt_the_finished_turn_lacks_is_kept_before_the_answer():
    """DeepSeek-R1's template opens the answer with "<think>\\n" but writes a finished turn
    without it: refused before ("does not render the conversation as its prompt followed by the
    answer"); the answer is now the text after the shared start, trained after the generation
    prompt as it is sampled. A template that renders the context itself otherwise is still refused."""
    r1 = build_char_tokenizer()
    r1.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|assistant|>think:' }}{% endif %}")
    row = _rows({"prompt": [USER], "completion": [ASSISTANT]})
    with pytest.warns(UserWarning, match="generation prompt '<.assistant.>think:' is no start"):
        example = encode_sft(row, r1, 64)[0][0]
    assert r1.decode(example.input_ids) == "<|user|>What is 1+2?<|assistant|>think: 3<eos>"
    assert _trained(r1, example) == " 3<eos>"
    odd = build_char_tokenizer()  # the prompt's own text differs once an answer follows
    odd.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if loop.last %}{{ m['content'] }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    with pytest.raises(DataError, match="does not render the conversation as its prompt followed by the answer"):
        encode_sft(row, odd, 64)


def test_a_reasoning_template_that_drops_the_thinking_from_finished_turns_trains_it_as_sampled():
    """DeepSeek-R1-Distill's template opens an answer with "<think>\\n" and writes a finished turn
    without the reasoning before "</think>": the reasoning was dropped and the bare answer trained
    right after "<think>\\n" (so the model learned never to close it), and an answer starting
    with "<" lost its first character to a character-wise shared start with "<think>". The answer
    is now the message as sampled after the generation prompt: its reasoning kept, "<think>\\n"
    not doubled, nothing of the content lost."""
    r1 = build_char_tokenizer()
    r1.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
                        "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}"
                        "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|assistant|>' + c + eos_token }}"
                        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|><think>\\n' }}"
                        "{% endif %}")
    for content, trained in (("<think>\nadd them\n</think>\n\n3", "add them\n</think>\n\n3<eos>"),
                             ("<b>3</b>", "<b>3</b><eos>"), ("3", "3<eos>")):
        row = _rows({"messages": [USER, {"role": "assistant", "content": content}]})
        with pytest.warns(UserWarning, match="generation prompt '<.assistant.><think>.n' is no start"):
            example = encode_sft(row, r1, 128)[0][0]
        assert _trained(r1, example) == trained
        assert r1.decode(example.input_ids[: example.prompt_len]) == "<|user|>What is 1+2?<|assistant|><think>\n"
    qwq = build_char_tokenizer()  # QwQ's strips the newlines after "</think>"; its turn ends with text holding 'e'
    qwq.chat_template = r1.chat_template.replace("c.split('</think>')[-1]", "c.split('</think>')[-1].lstrip('\\n')"
                                                 ).replace("+ eos_token", "+ '<end>' + eos_token")
    for content, trained in (("<think>\nadd them\n</think>\n\n3", "add them\n</think>\n\n3<end><eos>"),
                             ("e", "e<end><eos>"), ("d", "d<end><eos>")):
        with pytest.warns(UserWarning, match="is no start"):
            example = encode_sft(_rows({"messages": [USER, {"role": "assistant", "content": content}]}), qwq, 128)
        assert _trained(qwq, example[0][0]) == trained
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add"}}]}
    tools = build_char_tokenizer()  # a tool call (no text content): what follows the shared start, as before
    tools.chat_template = r1.chat_template.replace("{% set c = m['content'] %}",
                                                   "{% set c = m['content'] or 'CALL ' + m['tool_calls'][0]"
                                                   "['function']['name'] %}")
    with pytest.warns(UserWarning, match="is no start"):
        example = encode_sft(_rows({"prompt": [USER], "completion": [call]}), tools, 128)[0][0]
    assert _trained(tools, example) == "CALL add<eos>"
    rewritten = build_char_tokenizer()  # a finished turn that writes something else than the content: refused
    rewritten.chat_template = r1.chat_template.replace("'<|assistant|>' + c", "'<|assistant|>' + c.replace('x', 'y')")
    with pytest.raises(DataError, match="writes the finished answer otherwise than its content"):
        encode_sft(_rows({"messages": [USER, {"role": "assistant", "content": "abx"}]}), rewritten, 128)


def test_a_reasoning_templates_tool_turns_and_whole_conversations_keep_what_is_sampled():
    """Under a template whose generation prompt ("<think>\\n") no finished turn starts with: a turn
    of several messages was cut where the prompt and the turn part character by character (an
    answer starting with "<" lost it); an empty content the template writes nothing for is
    refused, not trained as a lone end; and with every token trained, a multi-turn conversation
    ends with its last turn as sampled, its reasoning kept (the whole rendering dropped it)."""
    r1 = build_char_tokenizer()
    r1.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
                        "{% elif m['role'] == 'tool' %}{{ '<|tool|>' + m['content'] }}"
                        "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}"
                        "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|assistant|>' + c + eos_token }}"
                        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|><think>\\n' }}"
                        "{% endif %}")
    turn = [{"role": "assistant", "content": "<b>x</b>"}, {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}]
    with pytest.warns(UserWarning, match="is no start"):
        example = encode_sft(_rows({"prompt": [USER], "completion": turn}), r1, 128)[0][0]
    assert _trained(r1, example) == "<b>x</b><eos><|tool|>sunny<|assistant|>Sunny.<eos>"
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add"}}]}
    with pytest.raises(DataError, match="writes nothing of this answer but its end"):
        encode_sft(_rows({"prompt": [USER], "completion": [call]}), r1, 128)
    conversation = [USER, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n3"},
                    {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\n4"}]
    with pytest.warns(UserWarning, match="is no start"):
        whole, report = encode_sft(_rows({"messages": conversation}), r1, 128, completion_only=False)
    assert [r1.decode(e.input_ids) for e in whole] == [
        "<|user|>What is 1+2?<|assistant|>\n\n3<eos><|user|>And 2+2?<|assistant|><think>\nx\n</think>\n\n4<eos>"]
    assert report.by_turn


def test_a_rows_chat_template_kwargs_reach_its_template_everywhere_it_is_rendered():
    """TRL passes a row's ``chat_template_kwargs`` (Qwen3's ``enable_thinking``) to the template; they
    were left unread, so the prompt lacked the empty think block a thinking-off Qwen3 writes. They
    reach every rendering (SFT, pairs, a GRPO prompt); a malformed one, or one beside plain text,
    is refused with its field."""
    from rlhfkit.data.encode import prompt_text

    think = build_char_tokenizer()
    think.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                           "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
                           "{% if enable_thinking is defined and not enable_thinking %}{{ '[no]' }}{% endif %}"
                           "{% endif %}")
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    row = _rows({"prompt": [USER], "completion": [ASSISTANT], **off})[0]
    assert prompt_text(row, think) == "<|user|>What is 1+2?<|assistant|>[no]"
    assert prompt_text(_rows({"prompt": [USER]})[0], think) == "<|user|>What is 1+2?<|assistant|>"
    assert prompt_text(_rows({"prompt": [USER], "chat_template_kwargs": '{"enable_thinking": false}'})[0],
                       think).endswith("[no]")  # a JSON string, as a CSV column holds it
    with pytest.warns(UserWarning, match="is no start of the finished answer"):  # '[no]' opens the answer
        example = encode_sft([row], think, 64)[0][0]
    assert think.decode(example.input_ids[: example.prompt_len]).endswith("<|assistant|>[no]")
    assert _trained(think, example) == " 3<eos>"
    pair = _rows({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": " 4"}],
                  **off})
    with pytest.warns(UserWarning):
        ranked = encode_rankings(pair, think, 64)[0][0]
    assert think.decode(ranked.prompt_ids).endswith("[no]")
    for bad, said in (({"chat_template_kwargs": [1]}, "must be an object of template variables"),
                      ({"chat_template_kwargs": "{x"}, "is a string but not valid JSON"),
                      ({"chat_template_kwargs": {"tools": []}}, "sets 'tools', which rlhfkit sets itself")):
        with pytest.raises(DataError, match=f"d.jsonl:1: field 'chat_template_kwargs' {said}"):
            prompt_text(_rows({"prompt": [USER], **bad})[0], think)
    with pytest.raises(DataError, match="field 'chat_template_kwargs' goes to a chat template, and this row's text"):
        encode_sft(_rows({"prompt": "Q", "completion": " A", **off}), think, 64)


def test_a_conversation_whose_last_turn_writes_the_eos_gets_no_second_one():
    """gpt-oss ends a tool-calling turn with <|call|> (no EOS) and the final answer with its EOS
    (<|return|>): the EOS appended for the first turn's sake was added after the last turn's own,
    training two."""
    oss = build_char_tokenizer()
    oss.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ '<call>' if m['content'].startswith('call') "
                         "else eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    row = _rows({"messages": [USER, {"role": "assistant", "content": "call add"},
                              {"role": "tool", "content": "3"}, ASSISTANT]})
    example = encode_sft(row, oss, 128)[0][0]
    assert oss.decode(example.input_ids).endswith("<|tool|>3<|assistant|> 3<eos>")
    assert example.input_ids.count(oss.eos_token_id) == 1
    assert _trained(oss, example) == "call add<call> 3<eos>"


def test_a_conversation_whose_template_rewrites_earlier_turns_trains_turn_by_turn():
    """Qwen3's template writes a think block in the last assistant turn alone, so a multi-turn
    conversation's earlier turns render otherwise once a later one follows: every such row was
    refused. Each assistant turn is now its own example, after the turns before it as the model
    reads them when it writes that turn, and the length report says how many rows were split;
    with every token trained (completion_only_loss=false), the conversation as written whole, as TRL."""
    qwen3 = build_char_tokenizer()
    qwen3.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
                           "{% if m['role'] == 'assistant' and loop.last %}{{ '[t]' }}{% endif %}"
                           "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    follow = {"role": "user", "content": "And 2+2?"}
    last = {"role": "assistant", "content": " 4"}
    rows = _rows({"messages": [USER, ASSISTANT, follow, last]}, {"messages": [USER, ASSISTANT]})
    examples, report = encode_sft(rows, qwen3, 128)
    assert [(qwen3.decode(e.input_ids[: e.prompt_len]), _trained(qwen3, e)) for e in examples] == [
        ("<|user|>What is 1+2?<|assistant|>", "[t] 3<eos>"),
        ("<|user|>What is 1+2?<|assistant|> 3<eos><|user|>And 2+2?<|assistant|>", "[t] 4<eos>"),
        ("<|user|>What is 1+2?<|assistant|>", "[t] 3<eos>")]
    assert report.by_turn == ["d.jsonl:1"] and "1 conversations trained turn by turn" in report.summary()
    _, cut = encode_sft(rows, qwen3, 25, overlong="skip")  # the second turn (33 tokens) does not fit: the row is kept
    assert (len(cut.skipped), cut.turns_skipped) == (0, 1) and "1 of their turns skipped" in cut.summary()
    _, cut = encode_sft(rows, qwen3, 30, overlong="truncate")  # its answer cut
    assert cut.truncated == 1 and not cut.skipped  # one row truncated, not one per turn
    with pytest.raises(DataError, match=r"no usable rows left .*2 rows, 0 truncated, 2 skipped"):  # every turn: rows
        encode_sft(rows, qwen3, 15, overlong="skip")
    whole, _ = encode_sft(rows[:1], qwen3, 128, completion_only=False)
    assert [qwen3.decode(e.input_ids) for e in whole] == [
        "<|user|>What is 1+2?<|assistant|> 3<eos><|user|>And 2+2?<|assistant|>[t] 4<eos>"]
    assert whole[0].prompt_len == 1


def test_images_and_tool_schemas_beside_plain_text_are_refused_not_dropped(tok):
    """An ``images`` column was ignored and the text trained alone; ``tools`` beside a plain-text
    prompt never reached a template. Both ran to rc 0."""
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'images': rlhfkit trains text models"):
        encode_sft(_rows({"prompt": "Describe it.", "completion": " A cat.", "images": ["cat.png"]}), tok, 64)
    assert encode_sft(_rows({"prompt": "Q", "completion": " A", "images": []}), tok, 64)[0]  # an empty list: none
    tools = [{"type": "function", "function": {"name": "w", "parameters": {}}}]
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'tools' goes to a chat template, and this row's text is "
                                        r"plain"):
        encode_sft(_rows({"prompt": "Q", "completion": " A", "tools": tools}), tok, 64)
    assert encode_sft(_rows({"prompt": [USER], "completion": [ASSISTANT], "tools": tools}), tok, 64)[0]


def test_sharegpt_rows_are_read_as_chatml(tok):
    """ShareGPT's ``conversations`` of ``from``/``value`` messages (``human``, ``gpt``) were refused
    with a misleading "prompt-only row is grpo and ppo data"; TRL converts them
    (``maybe_convert_to_chatml``)."""
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 1+2?"},
                                  {"from": "gpt", "value": " 3"}]}
    chatml = {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]}
    assert read_rows([sharegpt])[0].data == chatml
    assert encode_sft(read_rows([sharegpt]), tok, 64)[0] == encode_sft(read_rows([chatml]), tok, 64)[0]
    plain = {"prompt": "a", "completion": "b", "from": "somewhere"}  # a field named 'from' outside a chat: as it is
    assert read_rows([plain])[0].data == plain


def test_sharegpt_in_one_json_object_and_chatml_messages_with_a_from_field(tmp_path):
    """One ShareGPT conversation in a .json object was split into a row per message; a ChatML
    message carrying its own 'from' field had its role overwritten."""
    import json

    sharegpt = {"conversations": [{"from": "human", "value": "What is 1+2?"}, {"from": "gpt", "value": " 3"}]}
    (tmp_path / "one.json").write_text(json.dumps(sharegpt, indent=2))
    assert [r.data for r in read_rows(tmp_path / "one.json")] == [{"messages": [USER, ASSISTANT]}]
    tagged = {"messages": [USER, {**ASSISTANT, "from": "gpt-4"}]}
    assert read_rows([tagged])[0].data == tagged
    assert read_rows([{"prompt": "a", "completion": "b", "conversations": "notes"}])[0].data["conversations"] == "notes"


def test_content_given_as_text_parts_is_read_as_its_text(tok, tmp_path):
    """A message's content as a list of parts (OpenAI's form; TRL's vision datasets) was refused
    ("must have string 'role' and 'content'"); its text parts are one string, joined as the chat
    templates that take parts render them. A part of another kind is refused with its place."""
    import json

    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]

    as_parts = {"prompt": [{"role": "user", "content": parts("What is ", "1+2?")}],
                "completion": [{"role": "assistant", "content": parts(" 3")}]}
    plain = {"prompt": [USER], "completion": [ASSISTANT]}
    assert read_rows([as_parts])[0].data == plain
    assert encode_sft(read_rows([as_parts]), tok, 64)[0] == encode_sft(read_rows([plain]), tok, 64)[0]
    table = datasets.Dataset.from_list([as_parts, {"prompt": [{"role": "user", "content": parts("Hi")}],
                                                   "completion": [{"role": "assistant", "content": parts(" 3")}]}])
    assert read_rows(table)[0].data == plain  # a table's parts, with the null fields Arrow gives them
    image = {"messages": [{"role": "user", "content": [{"type": "image"}, *parts("What is it?")]}, ASSISTANT]}
    (tmp_path / "vl.jsonl").write_text(json.dumps(plain) + "\n" + json.dumps(image) + "\n")
    with pytest.raises(DataError, match=r"vl.jsonl:2: field 'messages\[0\]'.content\[0\] is a part of type 'image'; "
                                        r"rlhfkit trains text models"):
        read_rows(tmp_path / "vl.jsonl")
    with pytest.raises(DataError, match=r"<list>:row 1: field 'prompt\[0\]'.content\[0\] is not a part"):
        read_rows([{"prompt": [{"role": "user", "content": ["What is 1+2?"]}]}])


def test_a_rows_own_answer_follows_its_prompt_as_sft_trains_it(tok, chatml):
    """Distillation's off-policy steps (GKD's lmbda < 1) read each row's answer: the tokens SFT
    trains after the same prompt, in every form that has one; a row without one is named."""
    rows = _rows({"prompt": "What is 1+2?", "completion": " 3"},
                 {"prompt": [USER], "completion": [ASSISTANT]},
                 {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]})
    for row, t in zip(rows, (tok, chatml, chatml)):
        (example,), _ = encode_sft([row], t, 128)
        prompt, answer = encode_row_prompt(t, row), answer_ids(t, row)
        assert prompt + answer == example.input_ids and len(prompt) == example.prompt_len
    assert chatml.decode(answer_ids(chatml, rows[2])) == " 3<|im_end|>"
    assert tok.decode(answer_ids(tok, rows[0])) == " 3" + tok.eos_token
    for row in _rows({"prompt": "What is 1+2?", "answer": 3}, {"messages": [USER]},
                     {"messages": [USER, ASSISTANT, {"role": "user", "content": "and 2+2?"}]}):
        with pytest.raises(DataError, match=rf"^{row.where}: no answer to read \(fields present: "):
            answer_ids(chatml, row)


def test_an_implicit_text_pairs_prompt_ends_before_the_word_its_answers_part_in():
    """Split at the first differing character, "...Assistant: Sure" / "...Sorry" trained the prompt
    "...Assistant: S" and the answers "ure" / "orry": with a BPE tokenizer, tokens the model never
    samples after "Assistant:" (in 109-213 of 600 sequences), and the telling " Sure" against
    " Sorry" kept out of the answers. The prompt now ends before that word (a number too), its
    space with the answers, as TRL's extract_prompt keeps it."""
    from rlhfkit.data.formats import shared_prefix

    assert shared_prefix("Human: hi\n\nAssistant: Sure, yes", "Human: hi\n\nAssistant: Sorry, no") == (
        "Human: hi\n\nAssistant:", " Sure, yes", " Sorry, no")
    assert shared_prefix("x = 123", "x = 145") == ("x =", " 123", " 145")
    assert shared_prefix("A: 3.14", "A: 3.15") == ("A:", " 3.14", " 3.15")  # a decimal point is in its number
    assert shared_prefix("Q: 问题答案是对", "Q: 问题答案是错") == ("Q: 问题答案是", "对", "错")  # no spaces: by character
    assert shared_prefix("Ответ: Да", "Ответ: Дом") == ("Ответ:", " Да", " Дом")  # letters beyond ASCII are words
    assert shared_prefix("Antwort: Über", "Antwort: Übel") == ("Antwort:", " Über", " Übel")
    assert shared_prefix("A: yes.", "A: yes!") == ("A: yes", ".", "!")  # a split between words stays
    assert shared_prefix("abc", "abd") == ("ab", "c", "d")  # nothing before the word: the split stays
    chars = build_char_tokenizer()
    pair = encode_rankings(_rows({"chosen": "Q: 1+1=? A: two", "rejected": "Q: 1+1=? A: three"}), chars, 64)[0][0]
    assert chars.decode(pair.prompt_ids) == "Q: 1+1=? A:"
    assert [chars.decode(a) for a in pair.completion_ids] == [" two<eos>", " three<eos>"]


def test_a_template_writing_the_eos_at_the_conversations_end_alone_trains_multi_turn_rows():
    """Phi-3.5's template writes its EOS once, after the last turn of a rendering without a
    generation prompt: each earlier turn's text was cut after that EOS, which the next turn's
    context does not hold, and every multi-turn row was refused. An earlier turn now ends before
    it, and one EOS ends the conversation."""
    phi = build_char_tokenizer()
    phi.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}"
                         "{% endif %}")
    follow, last = {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": " 4"}
    examples, report = encode_sft(_rows({"messages": [USER, ASSISTANT, follow, last]}), phi, 128)
    assert len(examples) == 1 and not report.by_turn  # one sequence, both turns trained
    assert phi.decode(examples[0].input_ids) == ("<|user|>What is 1+2?<|end|>\n<|assistant|> 3<|end|>\n<|user|>And "
                                                 "2+2?<|end|>\n<|assistant|> 4<|end|>\n<eos>")
    assert _trained(phi, examples[0]) == " 3<|end|>\n 4<|end|>\n<eos>"
    tail = encode_sft(_rows({"messages": [USER, ASSISTANT, follow]}), phi, 128)[0][0]  # a user's turn after the answer
    assert phi.decode(tail.input_ids) == ("<|user|>What is 1+2?<|end|>\n<|assistant|> 3<|end|>\n<|user|>And 2+2?"
                                          "<|end|>\n<eos>")
    assert _trained(phi, tail) == " 3<|end|>\n"
    oss = build_char_tokenizer()  # an EOS that is the last turn's own end, written otherwise once a turn follows
    oss.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token if loop.last else '<|end|>' }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    examples, report = encode_sft(_rows({"messages": [USER, ASSISTANT, follow, last]}), oss, 128)
    assert [_trained(oss, e) for e in examples] == [" 3<eos>", " 4<eos>"] and report.by_turn  # turn by turn
    spaced = {"role": "assistant", "content": " 3\n"}  # the line break is the content's, not the template's
    examples, report = encode_sft(_rows({"messages": [USER, spaced, follow, last]}), oss, 128)
    assert [_trained(oss, e) for e in examples] == [" 3\n<eos>", " 4<eos>"] and report.by_turn


def test_a_text_that_ends_with_the_eos_gets_no_second_one(tok):
    """{"text": "hello world<eos>"} trained [..., EOS, EOS]: a target after the EOS. TRL adds the
    EOS only where the text lacks it; so does rlhfkit now, in text and prompt-completion rows."""
    for row in ({"text": "hello world<eos>"}, {"prompt": "Say:", "completion": " hello world<eos>"}):
        example = encode_sft(_rows(row), tok, 64)[0][0]
        assert example.input_ids[-2:] != [tok.eos_token_id] * 2 and example.input_ids[-1] == tok.eos_token_id
        assert tok.decode(example.input_ids).endswith("hello world<eos>")


def test_a_pair_missing_its_prompt_among_explicit_pairs_and_an_implicit_text_pair_sharing_nothing_are_refused(tok, tmp_path):
    """A CSV's empty prompt cell (read as absent) in a file of explicit pairs had been read as an
    implicit pair: " 126" / " 129" trained the prompt " 12" and the answers "6" / "9". An implicit
    text pair sharing no leading text had trained with an empty prompt (its chat form is refused)."""
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nWhat is 1+1?, 2, 3\n, 126, 129\n")
    with pytest.raises(DataError, match=r"p.csv:3: missing field 'prompt' \(fields present: chosen, rejected\), which "
                                        r"other rows of this data have \(.*p.csv:2\)"):
        encode_rankings(read_rows(tmp_path / "p.csv"), tok, 64)
    with pytest.raises(DataError, match=r"<list>:row 2: fields 'chosen' and 'rejected' share no leading text, so the "
                                        r"pair has no prompt"):
        encode_rankings(read_rows([{"chosen": "What is 1+1? 2", "rejected": "What is 1+1? 3"},
                                   {"chosen": "What is 7+5? 12", "rejected": "Something else 5"}]), tok, 64)
