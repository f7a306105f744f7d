"""Unpaired preference data (TRL's format for KTO): prompt, one completion, and a boolean
``label``, true where the answer is desirable. A pair (prompt, chosen, rejected; or implicit)
is read as two such rows, chosen desirable and rejected not, as TRL's KTOTrainer unpairs it.

A batch holds each row's answer after its own prompt, and for KTO's reference point the same
prompts each with another row's answer (``mismatched``): row i's prompt with row i-1's answer,
the last row's with the first's (TRL's rotation), so that the pairs are drawn afresh in every
batch of every epoch, whatever the order (HALOs', the paper's code, draws them so too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encode import LengthReport, completion_ids, encode_row_prompt, fit_length
from .formats import shared_prefix
from .prefs import RankingBatch, RankingExample, collate_rankings
from .rows import DataError, Row

UNPAIRED_FORMATS = ("unpaired_preference", "preference", "implicit_preference")


@dataclass(frozen=True)
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool


@dataclass
class UnpairedBatch:
    matched: RankingBatch  # each prompt with its own answer, one output per prompt
    desirable: torch.Tensor  # (P,) bool
    mismatched: RankingBatch | None = None  # each prompt with another row's answer (KTO's KL pairs)

    @property
    def num_prompts(self) -> int:
        return self.matched.num_prompts


def unpaired_answers(row: Row, method: str = "kto") -> list[tuple[str, object, bool]]:
    """(field, answer, desirable) of a row: its completion and label, or a pair's two answers."""
    from .formats import require_format

    fmt = require_format(row, method, UNPAIRED_FORMATS)
    if fmt == "unpaired_preference":
        label = row.data["label"]
        if not isinstance(label, bool):
            raise DataError(f"{row.where}: field 'label' must be true or false (the answer is desirable or not); "
                            f"got {label!r}")
        return [("completion", row.data["completion"], label)]
    for name in ("chosen", "rejected"):
        if name not in row.data:
            raise DataError(f"{row.where}: missing field '{name}' (fields present: {', '.join(sorted(row.data))})")
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    if fmt == "implicit_preference":
        _, chosen, rejected = shared_prefix(chosen, rejected)
    return [("chosen", chosen, True), ("rejected", rejected, False)]


def encode_unpaired(rows: list[Row], tokenizer, max_length: int, overlong: str = "error",
                    method: str = "kto") -> tuple[list[UnpairedExample], LengthReport]:
    """Every answer after its row's prompt, cut or skipped by ``overlong`` (a pair's two answers
    each on its own: as two rows of TRL's)."""
    report, examples = LengthReport(rows=len(rows)), []
    for row in rows:
        answers = unpaired_answers(row, method)
        prompt_ids = encode_row_prompt(tokenizer, row)
        cut = False
        for name, answer, desirable in answers:
            ids = completion_ids(tokenizer, row, name, answer)
            report.note_unknown(tokenizer, prompt_ids + ids, row.where)
            row_report = LengthReport()
            fitted = fit_length(prompt_ids, ids, max_length, overlong, row.where, row_report)
            if fitted is None:
                report.skipped.append(f"{row.where} ({name})" if len(answers) > 1 else row.where)
                continue
            cut |= row_report.truncated > 0
            report.note_length(*row_report.longest)
            examples.append(UnpairedExample(fitted[0], fitted[1], desirable))
        report.truncated += cut
    if not examples:
        raise DataError(f"no usable rows left after the length policy ({report.summary()})")
    return examples, report


def collate_unpaired(examples: list[UnpairedExample], pad_id: int, max_length: int | None = None) -> UnpairedBatch:
    """A batch of ``examples``: the matched answers and, given ``max_length``, the KL pairs (the
    module docstring's rotation), each answer cut to fit after its new prompt, as TRL cuts them."""
    def padded(pairs):
        return collate_rankings([RankingExample(p, [c], [0]) for p, c in pairs], pad_id)

    matched = padded([(e.prompt_ids, e.completion_ids) for e in examples])
    others = None
    if max_length is not None:
        others = padded([(e.prompt_ids, examples[i - 1].completion_ids[: max(max_length - len(e.prompt_ids), 1)])
                         for i, e in enumerate(examples)])
    return UnpairedBatch(matched, torch.tensor([e.desirable for e in examples]), others)
