"""Tasks: what a held-out answer is checked against, and the rewards a task ships.

A task has ``targets(rows)``, which reads (and validates) what each held-out row expects before
any training starts, and ``score(completions, targets) -> {"accuracy": ..., "n": ...}``. Two
ship: ``arithmetic`` (the embedded default: the completion's final number against the row's
integer answer) and ``reference`` (the greedy completion equals the row's reference
completion, after stripping whitespace: the check for any data without a checker of its own).
``auto`` picks ``arithmetic`` when every row has an integer answer, else ``reference``.

Adding a task: a class with ``name``, ``targets`` and ``score``, registered in ``TASKS``.
"""

from __future__ import annotations

from ..data.formats import answer_text
from ..data.rows import DataError, Row
from .arithmetic import ArithmeticTask, arithmetic_steps, contains_answer, exact_answer


def reference_completion(row: Row) -> str:
    """The row's reference answer text: ``completion``, ``chosen`` or the last assistant message
    (each plain text or, as TRL's conversational rows hold them, chat messages)."""
    for field in ("completion", "chosen", "messages"):
        text = answer_text(row.data.get(field))
        if text is not None and text.strip():
            return text
        if text is not None:
            raise DataError(f"{row.where}: field '{field}' is empty, so there is no reference to check an answer "
                            "against")
    raise DataError(f"{row.where}: no reference to check an answer against (a 'completion', 'chosen' or final "
                    f"assistant message; fields present: {', '.join(sorted(row.data))}); held-out rows are checked by "
                    "eval_task (arithmetic: an integer 'answer'; reference: that answer text), not by the reward "
                    "functions: give held-out rows that have one, or eval_data=null")


class ReferenceMatch:
    """The greedy completion equals the reference completion (whitespace at either end ignored)."""

    name = "reference"

    def targets(self, rows: list[Row]) -> list[str]:
        return [reference_completion(r).strip() for r in rows]

    def score(self, completions: list[str], targets: list[str]) -> dict:
        right = sum(c.strip() == t for c, t in zip(completions, targets))
        return {"accuracy": right / max(len(targets), 1), "n": len(targets)}


TASKS = {"arithmetic": ArithmeticTask(), "reference": ReferenceMatch()}
TASK_CHOICES = ("auto", *TASKS)

# Rewards by name, for configs and the command line (signatures in rollout/rewards.py).
OUTCOME_REWARDS = {"exact_answer": exact_answer, "contains_answer": contains_answer}
PROCESS_REWARDS = {"arithmetic_steps": arithmetic_steps}


def resolve_task(name: str, rows: list[Row]):
    """(task, targets) for held-out ``rows``; every row is checked now, before any training."""
    if name == "auto":
        try:
            return TASKS["arithmetic"], TASKS["arithmetic"].targets(rows)
        except DataError:
            name = "reference"
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; one of {', '.join(TASK_CHOICES)}")
    return TASKS[name], TASKS[name].targets(rows)
