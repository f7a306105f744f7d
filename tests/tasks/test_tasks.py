import pytest

from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.tasks import resolve_task


def test_held_out_prompts_without_a_reference_say_what_checks_them_and_what_they_hold():
    """TRL-style GRPO eval rows ({"prompt", "solution"}) were refused with "no reference to check
    an answer against", which did not say that evals are scored by eval_task, not by the rewards."""
    rows = read_rows([{"prompt": "What is 2+2?", "solution": "4"}])
    with pytest.raises(DataError, match=r"<list>:row 1: no reference to check an answer against \(.*; fields present: "
                                        r"prompt, solution\); held-out rows are checked by eval_task .*, not by the "
                                        r"reward functions"):
        resolve_task("auto", rows)
    task, targets = resolve_task("auto", read_rows([{"prompt": "What is 2+2?", "completion": " 4"}]))
    assert task.name == "arithmetic" and targets == [4]
    task, targets = resolve_task("auto", read_rows([{"prompt": "Say hi", "completion": " hi there"}]))
    assert task.name == "reference" and targets == ["hi there"]


def test_an_empty_reference_answer_is_named_as_empty():
    from rlhfkit.data.rows import Row
    from rlhfkit.tasks import reference_completion

    with pytest.raises(DataError, match=r"^e.jsonl:3: field 'completion' is empty, so there is no reference"):
        reference_completion(Row("e.jsonl:3", {"prompt": "What is 1+2?", "completion": " "}))
    assert reference_completion(Row("e.jsonl:4", {"prompt": "What is 1+2?", "completion": " 3"})) == " 3"
