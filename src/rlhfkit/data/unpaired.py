"""Unpaired preference data (TRL's format for KTO): prompt, one completion, and a boolean
``label``, true where the answer is desirable. A pair (prompt, chosen, rejected; or implicit)
is read as two such rows, chosen desirable and rejected not, as TRL's KTOTrainer unpairs it.

For KTO's reference point each example also carries another example's answer after its own
prompt (``mismatched``): the examples in an order drawn from a seed, each paired with the next
one's answer, the last with the first's (a cycle: no example meets its own answer). The pairs
are fixed once, as TRL fixes its (TRL rotates the answers within each batch of its unshuffled
data; HALOs, the paper's code, within each micro-batch), so that a step's pairs are the same
whatever its micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .encode import LengthReport, completion_ids, encode_row_prompt, fit_length
from .formats import check_prompt_fields, implicit_answers, require_format, row_format
from .prefs import RankingBatch, RankingExample, collate_rankings
from .rows import DataError, Row

UNPAIRED_FORMATS = ("unpaired_preference", "preference", "implicit_preference")


@dataclass(frozen=True)
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    mismatched_ids: list[int] | None = None  # another example's answer, cut to fit after this prompt


@dataclass
class UnpairedBatch:
    matched: RankingBatch  # each prompt with its own answer, one output per prompt
    desirable: torch.Tensor  # (P,) bool
    mismatched: RankingBatch | None = None  # each prompt with another row's answer (KTO's KL pairs)

    @property
    def num_prompts(self) -> int:
        return self.matched.num_prompts


def label_value(value) -> bool | None:
    """A label as a boolean: true / false, 1 / 0, or a csv cell of either; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return None


def unpaired_answers(row: Row, method: str = "kto") -> list[tuple[str, object, bool]]:
    """(field, answer, desirable) of a row: its completion and label, or a pair's two answers. A
    label is a boolean, or as a table writes one: 1 / 0, "True" / "False" (a csv cell)."""
    if row_format(row) == "prompt_completion":  # an unpaired row without its label (or a misspelt one)
        raise DataError(f"{row.where}: missing field 'label' (true where the completion is desirable; fields present: "
                        f"{', '.join(sorted(row.data))})")
    fmt = require_format(row, method, UNPAIRED_FORMATS)
    if fmt == "unpaired_preference":
        label = label_value(row.data["label"])
        if label is None:
            raise DataError(f"{row.where}: field 'label' must be true or false (the answer is desirable or not; "
                            f"1 / 0 and a table's \"True\" / \"False\" too); got {row.data['label']!r}")
        return [("completion", row.data["completion"], label)]
    for name in ("chosen", "rejected"):
        if name not in row.data:
            raise DataError(f"{row.where}: missing field '{name}' (fields present: {', '.join(sorted(row.data))})")
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    if fmt == "implicit_preference":
        chosen, rejected = implicit_answers(row)
    return [("chosen", chosen, True), ("rejected", rejected, False)]


def encode_unpaired(rows: list[Row], tokenizer, max_length: int, overlong: str = "error",
                    method: str = "kto") -> tuple[list[UnpairedExample], LengthReport]:
    """Every answer after its row's prompt, cut or skipped by ``overlong`` (a pair's two answers
    each on its own: as two rows of TRL's)."""
    check_prompt_fields(rows)
    report, examples = LengthReport(rows=len(rows)), []
    for row in rows:
        answers = unpaired_answers(row, method)
        prompt_ids = encode_row_prompt(tokenizer, row)
        cut = False
        for name, answer, desirable in answers:
            ids = completion_ids(tokenizer, row, name, answer)
            report.note_unknown(tokenizer, prompt_ids + ids, row.where)
            row_report = LengthReport()
            fitted = fit_length(prompt_ids, ids, max_length, overlong, row.where, row_report, field=name)
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


def with_mismatched(examples: list[UnpairedExample], max_length: int, seed: int) -> list[UnpairedExample]:
    """``examples``, each with another's answer (the module docstring's cycle), cut at its end to
    fit ``max_length`` after this example's prompt, as TRL cuts its pairs."""
    if len(examples) < 2:
        raise DataError("KTO's reference point pairs each prompt with another example's answer; the data has one "
                        "answer (loss_type=apo_zero_unpaired needs no pairs)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
    return [replace(e, mismatched_ids=examples[partner[i]].completion_ids[: max(max_length - len(e.prompt_ids), 1)])
            for i, e in enumerate(examples)]


def collate_unpaired(examples: list[UnpairedExample], pad_id: int) -> UnpairedBatch:
    """A batch of ``examples``: the matched answers and, where the examples carry them
    (``with_mismatched``), the mismatched ones."""
    def padded(pairs):
        return collate_rankings([RankingExample(p, [c], [0]) for p, c in pairs], pad_id)

    matched = padded([(e.prompt_ids, e.completion_ids) for e in examples])
    others = None
    if all(e.mismatched_ids is not None for e in examples):
        others = padded([(e.prompt_ids, e.mismatched_ids) for e in examples])
    return UnpairedBatch(matched, torch.tensor([e.desirable for e in examples]), others)
