import json

import pytest

from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.data.steps import collate_steps, encode_step_rows, split_steps
from rlhfkit.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_steps_are_read_at_the_separator_after_each_step(tok):
    rows = read_rows([{"prompt": "Q?", "completions": ["a1", "b"], "labels": [True, False]}])
    (example,), _ = encode_step_rows(rows, tok, "\n", 64)
    # one token per character: Q ? a 1 \n b \n -> the separators sit at 4 and 6
    assert tok.convert_ids_to_tokens(example.input_ids) == ["Q", "?", "a", "1", "\n", "b", "\n"]
    assert example.positions == [4, 6] and example.labels == (True, False)
    (sep_example,), _ = encode_step_rows(rows, tok, " ;; ", 64)
    assert sep_example.positions == [7, 12]  # the last token of a multi-token separator: Q ? a 1 _ ; ; _ b _ ; ; _
    batch = collate_steps([example, sep_example], tok.pad_token_id)
    assert batch.step_rows.tolist() == [0, 0, 1, 1] and batch.step_cols.tolist() == [4, 6, 7, 12]
    assert batch.labels.tolist() == [1.0, 0.0, 1.0, 0.0] and batch.attention_mask.sum(-1).tolist() == [7, 13]


def test_last_step_only_keeps_every_step_as_context_and_the_last_ones_label_alone(tok):
    """TRL's train_on_last_step_only: the input is the whole solution, and only the last step's
    label is trained (TRL sets the others to -100); a row cut short has lost that step."""
    rows = read_rows([{"prompt": "Q?", "completions": ["a1", "b", "c"], "labels": [True, False, True]},
                      {"prompt": "Q?", "completions": ["a1", "bbbbbbbb"], "labels": [True, False]}])
    full, _ = encode_step_rows(rows, tok, "\n", 64)
    last, _ = encode_step_rows(rows, tok, "\n", 64, last_step_only=True)
    for whole, only in zip(full, last):
        assert only.input_ids == whole.input_ids and only.positions == whole.positions[-1:]
        assert only.labels == whole.labels[-1:] and only.spans == whole.spans[-1:] and len(whole.labels) > 1
    batch = collate_steps(last, tok.pad_token_id)
    assert batch.step_cols.tolist() == [8, 13] and batch.labels.tolist() == [1.0, 0.0]
    cut, report = encode_step_rows(rows, tok, "\n", 9, "truncate")  # 9 tokens: the first row whole, the second cut
    assert [e.labels for e in cut] == [(True, False, True), (True,)] and report.truncated == 1
    cut, report = encode_step_rows(rows, tok, "\n", 9, "truncate", last_step_only=True)
    assert [e.labels for e in cut] == [(True,)] and report.skipped == [rows[1].where] and report.truncated == 0


def test_conversational_form_uses_the_chat_template(tok):
    plain = read_rows([{"prompt": "<|user|>Q?<|assistant|>", "completions": ["a", "b"], "labels": [True, True]}])
    chat = read_rows([{"prompt": [{"role": "user", "content": "Q?"}],
                       "completions": [{"role": "assistant", "content": "a"}, "b"], "labels": [True, True]}])
    (p,), _ = encode_step_rows(plain, tok, "\n", 64)
    (c,), _ = encode_step_rows(chat, tok, "\n", 64)
    assert c.input_ids == p.input_ids and c.positions == p.positions


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "completions": ["a", "b"], "labels": [True]}, "2 steps in 'completions' but 1 'labels'"),
    ({"prompt": "Q", "completions": ["a", "b"], "labels": [True, 2]},
     "field 'labels[1]' must be true or false (or 1 or 0), got 2"),
    ({"prompt": "Q", "completions": ["a", " "], "labels": [True, True]}, "field 'completions[1]' must be a non-empty"),
    ({"prompt": "Q", "completions": [], "labels": []}, "field 'completions' holds no steps"),
    ({"prompt": "Q", "completions": "a", "labels": [True]}, "field 'completions' must be a list"),
    ({"prompt": "Q", "completions": ["a"], "labels": None}, "field 'labels' must be a list (one entry per step), got missing"),
    ({"prompt": "Q", "completions": ["a", "b"], "ranks": [1, 2]}, "a ranking (prompt, completions) row is not PRM data; that format is for rm and dpo; a stepwise row has 'labels' beside 'completions', one per step"),
    ({"completions": ["a"], "labels": [True]}, "missing field 'prompt'"),
    ({"prompt": "Q", "completions": ["a", "b\nc"], "labels": [True, True]},
     "field 'completions[1]' holds the step separator '\\n'"),
    ({"prompt": "Q", "completions": ["a\n", "b\nc\n"], "labels": [True, True]},  # at a step's end it is no matter
     "field 'completions[1]' holds the step separator '\\n'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b"}, "a preference (prompt, chosen, rejected) row is not PRM data; "
                                                     "that format is for rm, dpo (cpo, orpo) and kto"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, tok, row, message):
    path = _jsonl(tmp_path / "prm.jsonl", [{"prompt": "Q", "completions": ["a"], "labels": [True]}, row])
    with pytest.raises(DataError) as e:
        encode_step_rows(read_rows(path), tok, "\n", 64)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_overlong_rows_keep_whole_steps_or_fail(tok):
    rows = read_rows([{"prompt": "Q?", "completions": ["aaa", "bbb"], "labels": [True, False]}])  # 2 + 4 + 4 tokens
    with pytest.raises(DataError, match=r"10 tokens \(prompt 2 \+ 2 steps of 'completions' 8, 1 of them within it\) "
                                        "exceed max_length=8"):
        encode_step_rows(rows, tok, "\n", 8)
    (cut,), report = encode_step_rows(rows, tok, "\n", 8, "truncate")
    assert cut.positions == [5] and cut.labels == (True,) and len(cut.input_ids) == 6 and report.truncated == 1
    with pytest.raises(DataError, match="no usable rows"):
        encode_step_rows(rows, tok, "\n", 8, "skip")


def test_split_steps_gives_each_step_and_where_it_ends():
    text = " 12+34=46\n46-5=41\nAnswer: 41\n"
    assert split_steps(text, "\n") == [(" 12+34=46", 9), ("46-5=41", 17), ("Answer: 41", 28)]
    assert text[:9].endswith("46") and text[:17].endswith("41") and text[:28].endswith("41")
    assert split_steps("no separator", "\n") == [("no separator", 12)] and split_steps("", "\n") == []


def test_labels_written_as_1_and_0_are_read_as_true_and_false(tmp_path, tok):
    path = _jsonl(tmp_path / "prm.jsonl", [{"prompt": "Q", "completions": ["a", "b"], "labels": [1, 0]}])
    (example,), _ = encode_step_rows(read_rows(path), tok, "\n", 64)
    assert example.labels == (True, False)


def test_a_separator_at_a_steps_end_is_written_once(tok):
    """Steps as some datasets store them, each ending with the separator: trained as a policy's
    completion split at it holds them (once), not twice; a step of nothing but it is refused."""
    plain = read_rows([{"prompt": "Q", "completions": ["a", "b"], "labels": [True, False]}])
    ended = read_rows([{"prompt": "Q", "completions": ["a; ", "; b; "], "labels": [True, False]}])
    (x,), _ = encode_step_rows(plain, tok, "; ", 64)
    (y,), _ = encode_step_rows(ended, tok, "; ", 64)
    assert y.input_ids == x.input_ids and y.positions == x.positions and y.spans == x.spans
    bare = read_rows([{"prompt": "Q", "completions": ["a", "; ; "], "labels": [True, False]}])
    with pytest.raises(DataError, match="'completions\\[1\\]' holds nothing but the step separator"):
        encode_step_rows(bare, tok, "; ", 64)
