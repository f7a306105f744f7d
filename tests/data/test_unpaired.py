"""Unpaired preference rows (data/unpaired.py): their labels, pairs read as two answers, and the
mismatched pairs of a batch."""

import pytest

from rlhfkit.data.encode import encode_completion, encode_prompt
from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.data.unpaired import collate_unpaired, encode_unpaired, with_mismatched
from rlhfkit.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_unpaired_rows_and_pairs_become_labelled_answers(tok):
    rows = read_rows([{"prompt": "1+1=", "completion": " 2", "label": True},
                      {"prompt": "2+2=", "completion": " 5", "label": False},
                      {"prompt": "3+3=", "chosen": " 6", "rejected": " 7"}])
    examples, report = encode_unpaired(rows, tok, max_length=64)
    assert [e.desirable for e in examples] == [True, False, True, False]
    assert examples[0].prompt_ids == encode_prompt(tok, "1+1=") and examples[0].completion_ids == encode_completion(tok, " 2")
    assert examples[3].completion_ids == encode_completion(tok, " 7")
    assert report.rows == 3 and not report.skipped
    implicit, _ = encode_unpaired(read_rows([{"chosen": "4+4= 8", "rejected": "4+4= 9"}]), tok, max_length=64)
    assert implicit[0].prompt_ids == implicit[1].prompt_ids == encode_prompt(tok, "4+4=")  # the shared start
    # beside explicit pairs, a pair without its prompt is a row missing it (its split would cut " 126" to " 12" | "6")
    with pytest.raises(DataError, match=r"<list>:row 2: missing field 'prompt' \(fields present: chosen, rejected\), "
                                        r"which other rows of this data have \(<list>:row 1\)"):
        encode_unpaired(read_rows([{"prompt": "3+3=", "chosen": " 6", "rejected": " 7"},
                                   {"chosen": " 126", "rejected": " 129"}]), tok, max_length=64)


def test_labels_as_tables_write_them(tok, tmp_path):
    (tmp_path / "u.csv").write_text("prompt,completion,label\n1+1=, 2,True\n2+2=, 5,false\n3+3=, 6,1\n")
    rows = read_rows(str(tmp_path / "u.csv")) + read_rows([{"prompt": "4+4=", "completion": " 9", "label": 0}])
    examples, _ = encode_unpaired(rows, tok, max_length=64)
    assert [e.desirable for e in examples] == [True, False, True, False]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completion": " a", "label": "yes"}, "<list>:row 1: field 'label' must be true or false"),
    ({"prompt": "p", "completion": " a", "label": 2}, "<list>:row 1: field 'label' must be true or false"),
    ({"prompt": "p", "completion": " a", "label": 1.0}, "<list>:row 1: field 'label' must be true or false"),
    ({"prompt": "p", "completion": " a"}, r"<list>:row 1: missing field 'label' \(true where"),
    ({"prompt": "p", "completion": " a", "labels": False}, r"missing field 'label' .*fields present: completion, labels"),
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


def test_each_example_meets_another_examples_answer_cut_to_fit(tok):
    rows = read_rows([{"prompt": "a", "completion": " 1111111111", "label": True},
                      {"prompt": "bb", "completion": " 2", "label": False},
                      {"prompt": "ccc", "completion": " 33", "label": True},
                      {"prompt": "dddd", "completion": " 444", "label": False}])
    examples, _ = encode_unpaired(rows, tok, max_length=13)
    paired = with_mismatched(examples, max_length=13, seed=0)
    answers = [e.completion_ids for e in examples]
    partners = []
    for e in paired:
        room = 13 - len(e.prompt_ids)
        partners.append([j for j, a in enumerate(answers) if a[:room] == e.mismatched_ids])
        assert len(e.prompt_ids) + len(e.mismatched_ids) <= 13
    partner = [p[0] for p in partners]
    assert all(len(p) == 1 for p in partners) and sorted(partner) == [0, 1, 2, 3]  # each answer used once
    assert all(partner[i] != i for i in range(4))  # never its own
    i = 0  # one cycle through all four
    for _ in range(4):
        i = partner[i]
    assert i == 0 and len({partner[0], partner[partner[0]], partner[partner[partner[0]]]}) == 3
    assert [e.mismatched_ids for e in with_mismatched(examples, 13, seed=0)] == [e.mismatched_ids for e in paired]
    others = [[e.mismatched_ids for e in with_mismatched(examples, 13, seed=s)] for s in range(1, 6)]
    assert any(o != [e.mismatched_ids for e in paired] for o in others)  # 6 cycles of 4: another seed, another
    batch = collate_unpaired(paired, tok.pad_token_id)
    assert batch.desirable.tolist() == [True, False, True, False]
    for k, e in enumerate(paired):
        assert batch.mismatched.input_ids[k][batch.mismatched.completion_mask[k].bool()].tolist() == e.mismatched_ids
    assert collate_unpaired(examples, tok.pad_token_id).mismatched is None  # apo_zero_unpaired: none
    with pytest.raises(DataError, match="pairs each prompt with another example's answer"):
        with_mismatched(examples[:1], 13, 0)
