import json
import random

from rlhfkit.tasks.arithmetic import multistep_problem, verify_steps, worked_steps


def test_worked_steps_put_the_wrong_step_where_asked():
    rng = random.Random(0)
    right = worked_steps(12, "+", 34, "-", 5)
    assert right == [" 12+34=46", "46-5=41", "Answer: 41"]
    assert "; ".join(right) == multistep_problem(12, "+", 34, "-", 5).completion == " 12+34=46; 46-5=41; Answer: 41"
    for wrong_at in (0, 1, 2):
        for _ in range(20):
            steps = worked_steps(12, "+", 34, "-", 5, wrong_at, rng)
            labels = [s.correct for s in verify_steps("What is 12+34-5?", "\n".join(steps))]
            assert labels.index(False) == wrong_at and steps[:wrong_at] == right[:wrong_at]


def test_the_tiny_default_writes_stepwise_rows_labelled_to_the_first_wrong_step(tiny):
    rows = [json.loads(line) for line in (tiny["data"] / "prm_train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 4000  # each training problem right, and wrong at each of its 3 steps
    for row in rows[:400]:
        labels = [s.correct for s in verify_steps(row["prompt"], "\n".join(row["completions"]))]
        assert row["labels"] == labels[: len(row["labels"])] and len(row["labels"]) == len(row["completions"])
        assert False not in row["labels"][:-1]  # nothing labelled after the first wrong step
    assert sorted({tuple(r["labels"]) for r in rows[:4]}) == [(False,), (True, False), (True, True, False),
                                                            (True, True, True)]
