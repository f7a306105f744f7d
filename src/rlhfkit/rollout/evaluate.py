"""Held-out evaluation: greedy answers from a rollout backend, checked by a task (tasks/)."""

from __future__ import annotations

from ..data.encode import check_prompt_row, encode_row_prompt
from ..data.formats import require_format, user_prompt
from ..data.rows import Row
from ..tasks import resolve_task
from .backend import SamplerBackend, SamplingParams
from .sampler import Samples, decode


def row_prompt_ids(tokenizer, rows: list[Row]) -> list[list[int]]:
    """Token ids of each row's prompt, plain or chat, as the model sees it."""
    return [encode_row_prompt(tokenizer, r) for r in rows]


def greedy_samples(backend, tokenizer, rows: list[Row], max_new_tokens: int, batch_size: int = 256) -> list[Samples]:
    params = SamplingParams(max_new_tokens, temperature=0.0)
    return [backend.generate(row_prompt_ids(tokenizer, rows[i: i + batch_size]), params)
            for i in range(0, len(rows), batch_size)]


# a prompt, and where there is one a reference answer (completion, chosen, messages' last turn,
# or an ``answer`` field): not an unpaired preference's (maybe rejected) answer, nor a PRM's steps
HELD_OUT_FORMATS = ("prompt_only", "prompt_completion", "language_modeling", "preference", "ranking")


class HeldOut:
    """Held-out prompts and what their answers are checked against, resolved (and validated) up front."""

    def __init__(self, rows: list[Row], task: str = "auto"):
        for row in rows:  # another method's rows (an unpaired preference's label: false answer) are no reference
            require_format(row, "held-out prompt", HELD_OUT_FORMATS)
            check_prompt_row(row)
        self.rows = rows
        self.task, self.targets = resolve_task(task, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def accuracy(self, backend, tokenizer, max_new_tokens: int) -> tuple[dict, list[Samples], list[dict]]:
        """The task's metrics on greedy answers, the samples (for scoring them further) and the
        first ``SHOWN`` rows' prompts, answers and targets (written beside the metrics)."""
        samples = greedy_samples(backend, tokenizer, self.rows, max_new_tokens)
        texts = [t for s in samples for t in decode(tokenizer, s)]
        shown = [{"prompt": user_prompt(row), "completion": text, "target": target}
                 for row, text, target in zip(self.rows[:SHOWN], texts, self.targets)]
        return self.task.score(texts, self.targets), samples, shown


SHOWN = 8  # held-out answers written at each eval (eval_samples.jsonl), as TRL logs a few completions


def exact_match(model, tokenizer, rows: list[Row], max_new_tokens: int = 32, task: str = "auto") -> dict:
    """Accuracy of ``model``'s greedy answers on ``rows`` (the sampler backend on the model itself)."""
    return HeldOut(rows, task).accuracy(SamplerBackend(tokenizer, model), tokenizer, max_new_tokens)[0]
