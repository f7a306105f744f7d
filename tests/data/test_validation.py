"""Rows are validated where they are read: file:line messages for every kind of bad input, prompt
rows against the fields their rewards read, the length policy counted per row (issue #17)."""

import json

import pytest

from rlhfkit.data.encode import check_prompts, completion_ids, encode_sft
from rlhfkit.data.prefs import encode_rankings, ranking_completions
from rlhfkit.data.rows import DataError, Row, read_rows, reads
from rlhfkit.models.load import load_tokenizer
from rlhfkit.rollout.rewards import RESERVED, reward_fields
from rlhfkit.tasks import OUTCOME_REWARDS


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny["base"])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_invalid_utf8_names_the_line_and_a_directory_is_named_as_one(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "a\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8 \(byte 0xff at column 14\)"):
        read_rows(bad)
    with pytest.raises(DataError, match=r": is a directory, not a data file"):
        read_rows(tmp_path)


def test_reward_fields_are_declared_or_read_from_the_signature():
    assert reward_fields(OUTCOME_REWARDS["exact_answer"]) == ("answer",)  # @reads("answer")

    def by_signature(prompts, completions, answer, *, unit, scale=1.0, **_):
        return [0.0] * len(completions)

    assert reward_fields(by_signature) == ("answer", "unit")  # no default: required

    @reads("source")
    def declared(prompts, completions, **row_fields):
        return [0.0] * len(completions)

    assert reward_fields(declared) == ("source",)
    assert reward_fields(lambda prompts, completions, **_: []) == ()


def test_a_prompt_row_without_a_field_a_reward_reads_fails_with_file_line_field(tmp_path, tok):
    rows = read_rows(_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1+1?", "answer": 2}] * 300
                            + [{"prompt": "What is 2+2?"}, {"prompt": "What is 3+3?", "answer": None}]))
    check_prompts(rows[:300], tok, ("answer",), RESERVED)
    with pytest.raises(DataError, match=r"p.jsonl:301: missing field 'answer' \(a reward reads it\)"):
        check_prompts(rows, tok, ("answer",), RESERVED)
    with pytest.raises(DataError, match=r"p.jsonl:302: field 'answer' \(a reward reads it\) is null"):
        check_prompts(rows[:300] + rows[301:], tok, ("answer",), RESERVED)
    with pytest.raises(DataError, match=r"<list>:row 1: missing field 'prompt'"):
        check_prompts(read_rows([{"answer": 1}]), tok)


def test_row_fields_named_like_reward_arguments_are_refused_by_name(tiny, tok):
    rankings = read_rows(tiny["data"] / "rankings_train.jsonl")[:3]  # a rankings file given as prompts: whose it is
    with pytest.raises(DataError, match=r"rankings_train.jsonl:1: a ranking \(prompt, completions\) row is not grpo or "
                                        r"ppo data; that format is for rm and dpo"):
        check_prompts(rankings, tok, (), RESERVED)
    for name in RESERVED:
        row = Row("x:1", {"prompt": "p", "answer": 2, name: 1})
        with pytest.raises(DataError, match=f"field '{name}' has the name of an argument every reward takes"
                           if name != "completions" else "a ranking"):  # prompt + completions: a ranking row
            check_prompts([row], tok, (), RESERVED)


def test_truncated_pairs_that_became_identical_are_skipped_and_counted_per_row(tok):
    rows = [Row("r:1", {"prompt": "What is 1+1?", "chosen": " 22222", "rejected": " 22223"}),  # same first tokens
            Row("r:2", {"prompt": "What is 1+1?", "chosen": " 2", "rejected": " 3"}),
            Row("r:3", {"prompt": "What is 1+1?", "completions": [" 2000", " 2001", " 2002", " 3"]}),
            Row("r:4", {"prompt": "What is 1+1?", "completions": [" 40000", " 5", " 6"]})]
    width = len(tok("What is 1+1?")["input_ids"])
    examples, report = encode_rankings(rows, tok, width + 3, "truncate")
    # r:1 and r:3 would hold identical (truncated) answers; r:4 is truncated and kept, r:2 fits.
    assert len(examples) == 2 and report.skipped == ["r:1", "r:3"] and report.identical == 2
    assert report.truncated == 1 and "2 skipped (2 because truncation left two of their answers identical)" in \
        report.summary()
    for example in examples:
        assert len({tuple(c) for c in example.completion_ids}) == len(example.completion_ids)
    examples, report = encode_rankings(rows, tok, width + 3, "skip")
    assert report.skipped == ["r:1", "r:3", "r:4"] and len(examples) == 1  # rows, not completions


def test_text_the_tokenizer_cannot_encode_is_counted_with_a_warning(tok):
    rows = [Row("s:1", {"prompt": "What is 1+1?", "completion": " 2"}),
            Row("s:2", {"prompt": "Wie viel ist 1+1? ✓", "completion": " zwei ✓"}),
            Row("s:3", {"prompt": "What is 2+2?", "completion": " 4 — vier"})]
    _, report = encode_sft(rows, tok, 64)
    assert report.unknown == ["s:2", "s:3"]
    assert "warning: 2 rows hold text the tokenizer maps to its unknown token (first: s:2)" in report.summary()
    assert "warning" not in encode_sft(rows[:1], tok, 64)[1].summary()
    assert check_prompts(rows, tok).unknown == ["s:2"]


def test_an_answer_of_the_wrong_type_or_with_nothing_after_the_shared_prompt_says_so(tok):
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'completion' must be a string or a list of chat messages, "
                                        r"got int"):
        completion_ids(tok, Row("d.jsonl:3", {"prompt": "a", "completion": 2}), "completion", 2)
    row = Row("p.jsonl:2", {"chosen": "What is 1+1? 2", "rejected": "What is 1+1? 2 3"})
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'chosen' has nothing after the prompt that 'chosen' and "
                                        r"'rejected' share"):
        ranking_completions(row, "rm")


def test_another_methods_rows_given_as_prompts_say_whose_they_are(tok):
    rows = read_rows([{"prompt": "Q", "completions": ["a"], "labels": [True]}])
    with pytest.raises(DataError, match=r"<list>:row 1: a stepwise-supervision .* row is not grpo or ppo data; that "
                                        r"format is for prm \(a process reward model\)"):
        check_prompts(rows, tok, reserved=RESERVED)


def test_a_prompt_rows_field_named_completions_is_said_to_make_it_a_ranking(tok):
    """A prompt row's own 'completions' column was refused as "a ranking row is not grpo or ppo
    data", which does not say which field made it one."""
    rows = read_rows([{"prompt": "Q", "completions": "a reference"}])
    with pytest.raises(DataError, match=r"<list>:row 1: a ranking .* row is not grpo or ppo data; that format is for rm and dpo; a field named "
                                        r"'completions' makes a row a ranking: in a prompt row rename it"):
        check_prompts(rows, tok, reserved=RESERVED)


def test_another_methods_rows_given_as_held_out_prompts_say_whose_they_are():
    """An unpaired-preference row's ``label: false`` answer was taken as the reference the greedy
    answers are checked against (GRPO's and PPO's eval_data, DPO's eval_prompts)."""
    from rlhfkit.rollout.evaluate import HeldOut

    kto = read_rows([{"prompt": "What is 1+1?", "completion": " 3", "label": False}])
    with pytest.raises(DataError, match=r"<list>:row 1: an unpaired-preference .* row is not held-out prompt data"):
        HeldOut(kto)
    assert len(HeldOut(read_rows([{"prompt": "What is 1+1?", "completion": " 2"}]))) == 1
    pair = HeldOut(read_rows([{"prompt": "What is 1+1?", "chosen": " 2", "rejected": " 3"}]))  # DPO's eval_prompts
    assert pair.targets == [2]
    steps = read_rows([{"prompt": "What is 1+1?", "completions": [" 2"], "labels": [True]}])
    with pytest.raises(DataError, match=r"a stepwise-supervision .* row is not held-out prompt data"):
        HeldOut(steps)



@pytest.mark.parametrize("answer, message", [
    ("three", "field 'answer' must be an integer, got 'three'"),
    (3.7, "field 'answer' must be an integer, got 3.7"),
    (True, "field 'answer' must be an integer, got True"),
    (None, "field 'answer' \\(a reward reads it\\) is null"),
])
def test_an_answer_that_is_no_integer_is_refused_before_any_model_loads(answer, message, tiny, tmp_path):
    """"three" passed the check and failed at the first rollout, naming no row; 3.7 was read as 3
    and true as 1 without a word; a null answer was "missing" among the fields present."""
    from helpers import quiet_train

    from rlhfkit.methods.grpo import GRPOConfig, run_grpo

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+2?", "answer": 3}) + "\n"
                    + json.dumps({"prompt": "What is 2+2?", "answer": answer}) + "\n")
    cfg = GRPOConfig(model=str(tmp_path / "no-model-yet"), tokenizer=str(tiny["base"]), train_data=str(data),
                     rewards="exact_answer", train=quiet_train(tmp_path / "g", max_steps=1))
    with pytest.raises(DataError, match=f"p.jsonl:2: {message}"):
        run_grpo(cfg)


def test_integer_answers_as_json_csv_and_parquet_write_them():
    import numpy as np

    from rlhfkit.tasks.arithmetic import as_integer, exact_answer

    assert [as_integer(v) for v in (3, 3.0, "3", " -12 ", "+4", np.int64(5), np.float32(6.0))] == [3, 3, 3, -12, 4, 5, 6]
    assert exact_answer(["q"] * 2, [" 3", " 4"], answer=["3", 4.0]) == [1.0, 1.0]
