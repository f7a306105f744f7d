"""Unpaired preference rows (data/unpaired.py): their labels, pairs read as two answers, and the
mismatched pairs of a batch."""

import pytest

from rlhfkit.data.encode import encode_completion, encode_prompt
from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.data.unpaired import collate_unpaired, encode_unpaired
from rlhfkit.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_unpaired_rows_and_pairs_become_labelled_answers(tok):
    rows = read_rows([{"prompt": "1+1=", "completion": " 2", "label": True},
                      {"prompt": "2+2=", "completion": " 5", "label": False},
                      {"prompt": "3+3=", "chosen": " 6", "rejected": " 7"},
                      {"chosen": "4+4= 8", "rejected": "4+4= 9"}])  # implicit: the shared start is the prompt
    examples, report = encode_unpaired(rows, tok, max_length=64)
    assert [e.desirable for e in examples] == [True, False, True, False, True, False]
    assert examples[0].prompt_ids == encode_prompt(tok, "1+1=") and examples[0].completion_ids == encode_completion(tok, " 2")
    assert examples[3].completion_ids == encode_completion(tok, " 7")
    assert examples[4].prompt_ids == examples[5].prompt_ids == encode_prompt(tok, "4+4=")
    assert report.rows == 4 and not report.skipped


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completion": " a", "label": "yes"}, "<list>:row 1: field 'label' must be true or false"),
    ({"prompt": "p", "completion": " a", "label": 1}, "<list>:row 1: field 'label' must be true or false"),
    ({"prompt": "p", "completions": [" a", " b"]}, "a ranking .* row is not kto data; that format is for rm and dpo"),
    ({"prompt": "p"}, "a prompt-only .* row is not kto data"),
])
def test_bad_unpaired_rows_are_named(tok, row, message):
    with pytest.raises(DataError, match=message):
        encode_unpaired(read_rows([row]), tok, max_length=64)


def test_over_long_answers_follow_the_policy_one_answer_at_a_time(tok):
    rows = read_rows([{"prompt": "1+1=", "chosen": " 2", "rejected": " " + "9" * 40}])
    examples, report = encode_unpaired(rows, tok, max_length=20, overlong="skip")
    assert [e.desirable for e in examples] == [True] and report.skipped == ["<list>:row 1 (rejected)"]
    with pytest.raises(DataError, match="row 1"):
        encode_unpaired(rows, tok, max_length=20, overlong="error")
    examples, report = encode_unpaired(rows, tok, max_length=20, overlong="truncate")
    assert len(examples[1].prompt_ids) + len(examples[1].completion_ids) == 20 and report.truncated == 1


def test_each_prompt_meets_the_previous_rows_answer_cut_to_fit(tok):
    rows = read_rows([{"prompt": "a", "completion": " 1111111111", "label": True},
                      {"prompt": "bb", "completion": " 2", "label": False},
                      {"prompt": "ccc", "completion": " 33", "label": True}])
    examples, _ = encode_unpaired(rows, tok, max_length=13)
    batch = collate_unpaired(examples, tok.pad_token_id, max_length=13)
    assert batch.desirable.tolist() == [True, False, True]

    def text(b, i):
        ids = b.input_ids[i][b.attention_mask[i].bool()].tolist()
        answer = b.input_ids[i][b.completion_mask[i].bool()].tolist()
        return tok.decode(ids[: len(ids) - len(answer)]), answer

    for i, (prompt, answer_of) in enumerate([(0, 2), (1, 0), (2, 1)]):
        shown, answer = text(batch.mismatched, i)
        assert shown == tok.decode(examples[prompt].prompt_ids)
        room = 13 - len(examples[prompt].prompt_ids)
        assert answer == examples[answer_of].completion_ids[:room]
    assert batch.mismatched.attention_mask.sum(-1).tolist()[1] == 13  # row 0's answer, cut after "bb"
    assert collate_unpaired(examples, tok.pad_token_id).mismatched is None  # apo_zero_unpaired: none
