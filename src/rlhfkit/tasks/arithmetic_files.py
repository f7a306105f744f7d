"""Data files for every method, generated from the arithmetic task (``arithmetic.py``).

``write_task_files(out_dir, seed)`` writes jsonl files, train and held-out:

  sft_{train,eval}.jsonl          prompt, completion
  prefs_{train,eval}.jsonl        prompt, chosen, rejected
  rankings_{train,eval}.jsonl     prompt, completions (best first, K from 4 to 9)
  prompts_{train,eval}.jsonl      prompt, answer
  multistep_sft_{train,eval}.jsonl, multistep_prompts_{train,eval}.jsonl
  prm_{train,eval}.jsonl          prompt, completions (the steps), labels (one bool per step):
                                  TRL's stepwise supervision, from the multi-step task, with
                                  wrong steps at known places

A labeller ranks answers by how wrong they are: the right answer first, then wrong answers
by growing distance from the truth. Distances are distinct, so a ranking has no ties.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .arithmetic import (
    STEP_SEPARATOR,
    Problem,
    multistep_operands,
    split_multistep,
    split_simple,
    verify_steps,
    worked_steps,
)

# How far a wrong answer is from the truth; K-1 distinct ones are drawn per ranking.
_ERRORS = (1, 2, 3, 5, 8, 10, 13, 20, 30, 40, 50)


def _wrong_answers(answer: int, n: int, rng: random.Random) -> list[int]:
    """n wrong answers (>= 0), sorted by growing distance from ``answer``."""
    errors = sorted(rng.sample(_ERRORS, n))
    out = []
    for e in errors:
        sign = rng.choice((-1, 1))
        value = answer + sign * e
        out.append(value if value >= 0 else answer + e)
    return out


def ranking_row(p: Problem, k: int, rng: random.Random) -> dict:
    wrong = _wrong_answers(p.answer, k - 1, rng)
    return {"prompt": p.prompt, "completions": [p.completion] + [f" {w}" for w in wrong]}


def pair_row(p: Problem, rng: random.Random) -> dict:
    (wrong,) = _wrong_answers(p.answer, 1, rng)
    return {"prompt": p.prompt, "chosen": p.completion, "rejected": f" {wrong}"}


def step_row(p: Problem, wrong_at: int | None, rng: random.Random) -> dict:
    """A worked multi-step solution with a wrong step at ``wrong_at`` (or none), each step labelled by
    the task's own checker (``verify_steps``) up to and including the first wrong one, as PRM800K
    labels them (Lightman et al. 2023): every labelled step is judged on a correct prefix."""
    steps = worked_steps(*multistep_operands(p.prompt), wrong_at=wrong_at, rng=rng)
    labels = [s.correct for s in verify_steps(p.prompt, STEP_SEPARATOR.join(steps))]
    end = labels.index(False) + 1 if False in labels else len(labels)
    return {"prompt": p.prompt, "completions": steps[:end], "labels": labels[:end]}


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def write_task_files(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write every data file of the tiny default into ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, held_out = split_simple(seed)
    m_train, m_held_out = split_multistep(seed)
    files: dict[str, list[dict]] = {}
    step_rng = random.Random(seed + 2)  # its own stream: the other files do not change with it
    for split, problems, m_problems in (("train", train, m_train), ("eval", held_out, m_held_out)):
        files[f"sft_{split}"] = [{"prompt": p.prompt, "completion": p.completion} for p in problems]
        files[f"prefs_{split}"] = [pair_row(p, rng) for p in problems]
        files[f"rankings_{split}"] = [ranking_row(p, rng.randint(4, 9), rng) for p in problems]
        files[f"prompts_{split}"] = [{"prompt": p.prompt, "answer": p.answer} for p in problems]
        files[f"multistep_sft_{split}"] = [{"prompt": p.prompt, "completion": p.completion} for p in m_problems]
        files[f"multistep_prompts_{split}"] = [{"prompt": p.prompt, "answer": p.answer} for p in m_problems]
        # train: every problem once right and once wrong at each step; held out: one of the four at random
        files[f"prm_{split}"] = ([step_row(p, w, step_rng) for p in m_problems for w in (None, 0, 1, 2)]
                                 if split == "train" else
                                 [step_row(p, step_rng.choice((None, 0, 1, 2)), step_rng) for p in m_problems])
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        _write(paths[name], rows)
    return paths
