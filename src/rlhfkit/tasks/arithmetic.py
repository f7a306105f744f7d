"""The embedded synthetic task: two-digit arithmetic with checkable answers.

Two variants:
  * ``simple``:    "What is 82-27?"   -> " 55"
  * ``multistep``: "What is 12+34-5?" -> " 12+34=46; 46-5=41; Answer: 41"

The multi-step completion writes each step out, separated by "; " (``STEP_SEPARATOR``, the
separator a learned process reward model reads steps at), so a process reward can judge every step
(``verify_steps``) and say at which character each step ends. Everything is made from a seed,
deterministically; nothing is downloaded.
"""

from __future__ import annotations

import numbers
import random
import re
from dataclasses import dataclass

from ..data.formats import answer_text, completion_text
from ..data.rows import DataError, Row, reads
from ..data.steps import char_to_token_index

_PROMPT_RE = re.compile(r"What is (\d+)([+-])(\d+)(?:([+-])(\d+))?\?")
_STEP_RE = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
# Between the steps of a multi-step completion. "; " rather than a newline: on 2026-12-02 (seed 0,
# one thread) GRPO from the multi-step SFT snapshot gained +0.23 exact match with the rule PRM and
# +0.22 with the learned one after "; ", against +0.07 and +0.04 after "\n" (", ": +0.21, +0.14).
STEP_SEPARATOR = "; "


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: int
    completion: str  # the reference (demonstration) completion


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def simple_problem(a: int, op: str, b: int) -> Problem:
    return Problem(f"What is {a}{op}{b}?", _apply(a, op, b), f" {_apply(a, op, b)}")


def multistep_problem(a: int, op1: str, b: int, op2: str, c: int) -> Problem:
    mid = _apply(a, op1, b)
    final = _apply(mid, op2, c)
    return Problem(f"What is {a}{op1}{b}{op2}{c}?", final, STEP_SEPARATOR.join(worked_steps(a, op1, b, op2, c)))


def worked_steps(a: int, op1: str, b: int, op2: str, c: int, wrong_at: int | None = None,
                 rng: random.Random | None = None) -> list[str]:
    """The three steps of a multi-step solution: two equations, then "Answer: N".

    With ``wrong_at`` (0, 1 or 2) that step is wrong, as a policy's slips are: a result off by a
    little, or a miscopied operand (computed right for the wrong number); the steps after it
    continue from what it wrote. ``verify_steps`` labels them (a later step that continues
    correctly from a wrong value is itself correct; the final answer is then wrong).
    """
    rng = rng or random.Random(0)

    def slip(value: int) -> int:  # off by a little, never below 0
        step = rng.choice((1, 2, 3, 10))
        return value + step if value < 10 or rng.random() < 0.5 else value - step

    steps, x = [], a
    for i, (op, y) in enumerate(((op1, b), (op2, c))):
        z = _apply(x, op, y)
        if wrong_at == i:
            copied = (x, slip(y)) if rng.random() < 0.5 else (slip(x), y)
            if rng.random() < 0.5 and _apply(copied[0], op, copied[1]) >= 0:  # a miscopied operand
                x, y = copied
                z = _apply(x, op, y)
            else:  # a slip in the result
                z = slip(z)
        steps.append(f"{' ' if i == 0 else ''}{x}{op}{y}={z}")
        x = z
    steps.append(f"Answer: {slip(x) if wrong_at == 2 else x}")
    return steps


def all_simple_problems() -> list[Problem]:
    """Every two-digit problem: a+b for all a, b in 10..99, and a-b for a >= b (answers >= 0)."""
    out = []
    for a in range(10, 100):
        for b in range(10, 100):
            out.append(simple_problem(a, "+", b))
            if a >= b:
                out.append(simple_problem(a, "-", b))
    return out


def split_simple(seed: int = 0, n_eval: int = 500) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out splits of the two-digit problems."""
    problems = all_simple_problems()
    random.Random(seed).shuffle(problems)
    return problems[n_eval:], problems[:n_eval]


def split_multistep(seed: int = 0, n_train: int = 4000, n_eval: int = 300) -> tuple[list[Problem], list[Problem]]:
    """Random three-number problems (two-digit, two-digit, one-digit), all intermediate values >= 0."""
    rng = random.Random(seed + 1)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_eval:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 9)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        if op1 == "-" and a < b:
            a, b = b, a
        p = multistep_problem(a, op1, b, op2, c)
        if p.answer < 0 or p.prompt in seen:
            continue
        seen.add(p.prompt)
        problems.append(p)
    return problems[n_eval:], problems[:n_eval]


def multistep_operands(prompt: str) -> tuple[int, str, int, str, int]:
    """(a, op1, b, op2, c) of a multi-step prompt "What is a op1 b op2 c?"."""
    m = _PROMPT_RE.search(prompt)
    if m is None or m.group(4) is None:
        raise ValueError(f"not a multi-step arithmetic prompt: {prompt!r}")
    a, op1, b, op2, c = m.groups()
    return int(a), op1, int(b), op2, int(c)


def solve(prompt: str) -> int:
    """The exact answer of a task prompt; ValueError if the prompt is not one of ours."""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    a, op1, b, op2, c = m.groups()
    value = _apply(int(a), op1, int(b))
    return _apply(value, op2, int(c)) if op2 else value


def extract_answer(completion: str) -> int | None:
    """The number a completion answers with: after "Answer:" if present, else the whole text."""
    m = _ANSWER_RE.search(completion)
    text = m.group(1) if m else completion.strip()
    try:
        return int(text)
    except ValueError:
        return None


def verify(prompt: str, completion: str) -> float:
    """Outcome reward: 1.0 if the completion's answer is exactly right, else 0.0."""
    return 1.0 if extract_answer(completion) == solve(prompt) else 0.0


@dataclass(frozen=True)
class Step:
    char_end: int  # index in the completion just past the step's last character
    correct: bool


def verify_steps(prompt: str, completion: str) -> list[Step]:
    """Process supervision for the multi-step variant: one entry per written step.

    A step "x op y = z" is correct when its operands continue the prompt's chain (the first
    step uses the prompt's first two numbers, the next starts from the previous step's
    result) and z is the right value; the closing "Answer: N" is a step of its own.
    """
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    a, op1, b, op2, c = m.groups()
    chain = [(int(a), op1, int(b))] + ([(None, op2, int(c))] if op2 else [])
    steps, previous = [], None
    for i, sm in enumerate(_STEP_RE.finditer(completion)):
        x, op, y, z = int(sm.group(1)), sm.group(2), int(sm.group(3)), int(sm.group(4))
        ok = i < len(chain) and z == _apply(x, op, y)
        if ok:
            want_x, want_op, want_y = chain[i]
            ok = (x == (want_x if want_x is not None else previous)) and op == want_op and y == want_y
        previous = z
        steps.append(Step(sm.end(), ok))
    am = _ANSWER_RE.search(completion)
    if am is not None:
        steps.append(Step(am.end(), int(am.group(1)) == solve(prompt)))
    return steps


# --- rewards (the signatures of rollout/rewards.py) -------------------------------------------

def as_integer(value) -> int:
    """An ``answer`` value as an integer: an int, a float with no fraction (JSON's 3.0) or a text
    of digits (CSV's "3"); ValueError for anything else (3.7, true, "three")."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, numbers.Integral):  # numpy's integers too (rows from a DataFrame)
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(value)


def integer_answer(row: Row) -> int:
    """The row's ``answer`` field as an integer; a DataError naming the row otherwise."""
    try:
        return as_integer(row.data["answer"])
    except ValueError:
        raise DataError(f"{row.where}: field 'answer' must be an integer, got {row.data['answer']!r}") from None


@reads("answer", check=integer_answer)
def exact_answer(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 when the completion's answer is exactly the row's ``answer``, else 0.0."""
    return [1.0 if extract_answer(completion_text(c)) == as_integer(a) else 0.0 for c, a in zip(completions, answer)]


@reads("answer", check=integer_answer)
def contains_answer(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 if the right answer appears as a whole number anywhere in the completion (BENCHMARK.md)."""
    return [1.0 if re.search(rf"(?<![\d-]){as_integer(a)}(?!\d)", completion_text(c)) else 0.0
            for c, a in zip(completions, answer)]


def arithmetic_steps(prompts, completions, completion_ids=None, tokenizer=None, **_) -> list[list[tuple[int, float]]]:
    """Process reward of the multi-step task: 1.0 per correct step, 0.0 per wrong one.

    A completion with no recognisable step gets one 0.0 step on its last token.
    """
    out = []
    for prompt, completion, ids in zip(prompts, completions, completion_ids):
        steps = [(char_to_token_index(tokenizer, ids, s.char_end), 1.0 if s.correct else 0.0)
                 for s in verify_steps(prompt, completion_text(completion))]
        out.append(steps or [(max(len(ids) - 1, 0), 0.0)])
    return out


# --- held-out checking ------------------------------------------------------------------------

def reference_answer(row: Row) -> int:
    """The expected answer: the row's ``answer`` field, else the one its reference completion gives."""
    if "answer" in row.data:
        return integer_answer(row)
    for field in ("completion", "chosen", "messages"):
        text = answer_text(row.data.get(field))
        value = extract_answer(text) if text is not None else None
        if value is not None:
            return value
    raise DataError(f"{row.where}: no integer 'answer' field and no reference completion that ends in a number")


class ArithmeticTask:
    """Exact match of the completion's final number against the row's integer answer."""

    name = "arithmetic"

    def targets(self, rows: list[Row]) -> list[int]:
        return [reference_answer(r) for r in rows]

    def score(self, completions: list[str], targets: list[int]) -> dict:
        right = sum(extract_answer(c) == t for c, t in zip(completions, targets))
        return {"accuracy": right / max(len(targets), 1), "n": len(targets)}
