"""Step-labelled rows for process reward models (TRL's stepwise-supervision format).

A row is ``prompt``, ``completions`` (the steps of one solution, in order) and ``labels`` (one
bool per step: is this step right). In the conversational form ``prompt`` is a list of chat
messages (rendered by the tokenizer's chat template, ending in an assistant turn's opening)
and a step may be an assistant message ``{"role": "assistant", "content": ...}``.

The model reads ``prompt, step_1, sep, step_2, sep, ..., step_n, sep``: each step is followed
by the separator, and step j's score is read at the last token of the separator after it.
GRPO builds the same sequence from a policy's completion by splitting it at the separator
(``split_steps``), so a score means the same in training and in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encode import OVERLONG_HINT, LengthReport, encode_prompt, encode_row_prompt
from .formats import require_format
from .rows import DataError, Row, get_str


@dataclass(frozen=True)
class StepExample:
    input_ids: list[int]
    positions: list[int]  # index of the last separator token after each step
    labels: tuple[bool, ...]  # one per step (empty when scoring unlabelled steps)
    spans: tuple[tuple[int, int], ...] = ()  # each step's own tokens [start, end), the separator excluded


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    step_rows: torch.Tensor  # (N,) the row of each step, N = steps of the batch
    step_cols: torch.Tensor  # (N,) the position its score is read at
    labels: torch.Tensor  # (N,) 1.0 for a right step, 0.0 for a wrong one
    step_spans: torch.Tensor  # (N, 2) each step's own tokens [start, end) (the likelihood read-out's)


def step_prompt(row: Row, tokenizer) -> list[int]:
    """Token ids of a row's prompt: plain text, or chat messages through the chat template."""
    prompt = row.data.get("prompt")
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{row.where}: field 'prompt[{i}]' must have string 'role' and 'content'")
        if not prompt:
            raise DataError(f"{row.where}: field 'prompt' is an empty list of messages")
        return encode_row_prompt(tokenizer, row)  # as every other reader encodes it (tools, BOS)
    return encode_prompt(tokenizer, get_str(row, "prompt"))


def read_steps(row: Row) -> tuple[list[str], tuple[bool, ...]]:
    """(steps, labels) of a row, or a DataError naming the place and the field."""
    if "completions" not in row.data or "labels" not in row.data:  # another method's (pairs, rankings): say which
        require_format(row, "PRM", ("stepwise",))
    steps, labels = row.data.get("completions"), row.data.get("labels")
    for name, value in (("completions", steps), ("labels", labels)):
        if not isinstance(value, list):
            got = "missing" if value is None else f"a {type(value).__name__}"
            raise DataError(f"{row.where}: field '{name}' must be a list (one entry per step), got {got}")
    if not steps:
        raise DataError(f"{row.where}: field 'completions' holds no steps")
    if len(labels) != len(steps):
        raise DataError(f"{row.where}: {len(steps)} steps in 'completions' but {len(labels)} 'labels'")
    texts = []
    for i, (step, label) in enumerate(zip(steps, labels)):
        if isinstance(step, dict) and step.get("role") == "assistant":
            step = step.get("content")
        if not isinstance(step, str) or not step.strip():
            raise DataError(f"{row.where}: field 'completions[{i}]' must be a non-empty step (a string or an "
                            f"assistant message), got {step!r}")
        if not isinstance(label, bool) and label not in (0, 1):  # 0 and 1: as TRL's datasets often write them
            raise DataError(f"{row.where}: field 'labels[{i}]' must be true or false (or 1 or 0), got {label!r}")
        texts.append(step)
    return texts, tuple(bool(label) for label in labels)


def separator_ids(tokenizer, separator: str) -> list[int]:
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"the step separator {separator!r} is no token at all for this tokenizer")
    return ids


def encode_steps(tokenizer, prompt_ids: list[int], steps: list[str],
                 sep_ids: list[int]) -> tuple[list[int], list[int], tuple[tuple[int, int], ...]]:
    """``prompt, step_1, sep, ..., step_n, sep`` as ids, the index of each step's last separator
    token, and each step's own tokens as [start, end) spans."""
    ids, positions, spans = list(prompt_ids), [], []
    for step in steps:
        start = len(ids)
        ids += tokenizer(step, add_special_tokens=False)["input_ids"]
        spans.append((start, len(ids)))
        ids += sep_ids
        positions.append(len(ids) - 1)
    return ids, positions, tuple(spans)


def _inner(step: str, separator: str) -> str:
    """A step without separators at its ends: splitting a completion at one there gives a blank
    piece, which is no step (``split_steps``), so only one inside the step is ambiguous."""
    while separator and step.startswith(separator):
        step = step[len(separator):]
    while separator and step.endswith(separator):
        step = step[: -len(separator)]
    return step


def encode_step_rows(rows: list[Row], tokenizer, separator: str, max_length: int, overlong: str = "error",
                     last_step_only: bool = False) -> tuple[list[StepExample], LengthReport]:
    """Every row checked and encoded. Over-long rows: an error, skipped, or (``truncate``) cut
    after the last whole step that fits. ``last_step_only`` (TRL's ``train_on_last_step_only``):
    each example keeps the last step's label (and place) alone, the steps before it its context; a
    row cut short has lost its last step and is skipped."""
    sep_ids, report, examples = separator_ids(tokenizer, separator), LengthReport(rows=len(rows)), []
    for row in rows:
        steps, labels = read_steps(row)
        # a separator at a step's start or end is written once, after it (TRL's PRMTrainer writes it twice):
        # the policy's completions that GRPO's prm: splits hold it once
        steps = [_inner(step, separator) for step in steps]
        blank = next((i for i, step in enumerate(steps) if not step.strip()), None)
        if blank is not None:
            raise DataError(f"{row.where}: field 'completions[{blank}]' holds nothing but the step separator "
                            f"{separator!r}")
        inside = next((i for i, step in enumerate(steps) if separator in step), None)
        if inside is not None:
            raise DataError(f"{row.where}: field 'completions[{inside}]' holds the step separator {separator!r}; a "
                            "policy's completion is split at it (GRPO's prm:), so the model would learn one step where "
                            "it is later asked about several: split the step, or set another step_separator")
        prompt_ids = step_prompt(row, tokenizer)
        ids, positions, spans = encode_steps(tokenizer, prompt_ids, steps, sep_ids)
        if len(ids) > max_length:
            if overlong == "error":
                fits = sum(p < max_length for p in positions)
                raise DataError(f"{row.where}: {len(ids)} tokens (prompt {len(prompt_ids)} + {len(steps)} steps of "
                                f"'completions' {len(ids) - len(prompt_ids)}, {fits} of them within it) exceed "
                                f"max_length={max_length}; {OVERLONG_HINT}")
            fits = sum(p < max_length for p in positions) if overlong == "truncate" and not last_step_only else 0
            if fits == 0:
                report.skipped.append(row.where)
                continue
            report.truncated += 1
            ids, positions, labels, spans = ids[: positions[fits - 1] + 1], positions[:fits], labels[:fits], spans[:fits]
        report.note_length(len(ids), row.where)
        if last_step_only:
            positions, labels, spans = positions[-1:], labels[-1:], spans[-1:]
        examples.append(StepExample(ids, positions, labels, spans))
    if not examples:
        raise DataError(f"no usable rows left after the length policy ({report.summary()})")
    return examples, report


def collate_steps(examples: list[StepExample], pad_id: int) -> StepBatch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, labels, spans = [], [], [], []
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
        rows += [i] * len(e.positions)
        cols += e.positions
        labels += [float(x) for x in e.labels]
        spans += list(e.spans) or [(p, p) for p in e.positions]  # no spans given: empty ones
    return StepBatch(input_ids, attention, torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long),
                     torch.tensor(labels, dtype=torch.float32), torch.tensor(spans, dtype=torch.long).view(-1, 2))


def split_steps(text: str, separator: str) -> list[tuple[str, int]]:
    """The steps of a completion as a policy wrote them, split at ``separator``, each with the
    index just past its last character; blank pieces (a trailing separator) are no steps."""
    out, start = [], 0
    for piece in text.split(separator):
        if piece.strip():
            out.append((piece, start + len(piece)))
        start += len(piece) + len(separator)
    return out


def char_to_token_index(tokenizer, ids: list[int], char_end: int) -> int:
    """Index of the token that holds character ``char_end - 1`` of ``decode(ids)``."""
    length = 0
    for k in range(len(ids)):
        length = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True))
        if length >= char_end:
            return k
    return max(len(ids) - 1, 0)
