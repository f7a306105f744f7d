"""Turning validated rows into token ids: prompts, completions, length policy, SFT batches.

A row is either plain text (``prompt`` + ``completion``) or chat (``messages``, the last one
the assistant's answer), in which case the tokenizer's chat template renders the prompt.
Completions always end with the EOS id, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .rows import DataError, Row, get_str

OVERLONG_POLICIES = ("error", "truncate", "skip")


@dataclass
class LengthReport:
    """What the length policy did; printed and logged, never silent."""

    rows: int = 0
    truncated: int = 0  # rows, not completions: a ranking with three cut answers counts once
    skipped: list[str] = field(default_factory=list)  # where of each skipped row
    unknown: list[str] = field(default_factory=list)  # where of each row with text the tokenizer maps to <unk>
    identical: int = 0  # of the skipped: rows whose answers truncation made identical

    def summary(self) -> str:
        text = f"{self.rows} rows, {self.truncated} truncated, {len(self.skipped)} skipped"
        if self.identical:
            text += f" ({self.identical} because truncation left two of their answers identical)"
        if self.unknown:
            text += (f"; warning: {len(self.unknown)} rows hold text the tokenizer maps to its unknown token "
                     f"(first: {self.unknown[0]})")
        return text

    def note_unknown(self, tokenizer, ids: list[int], where: str) -> None:
        unk = tokenizer.unk_token_id
        if unk is not None and unk in ids and (not self.unknown or self.unknown[-1] != where):
            self.unknown.append(where)


def prompt_text(row: Row, tokenizer) -> str:
    """The prompt of a plain or chat row, as the model sees it."""
    if "messages" in row.data:
        messages = _messages(row)
        return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return get_str(row, "prompt")


def sft_texts(row: Row, tokenizer) -> tuple[str, str]:
    """(prompt, completion) of an SFT row."""
    if "messages" in row.data:
        messages = _messages(row)
        return prompt_text(row, tokenizer), messages[-1]["content"]
    return get_str(row, "prompt"), get_str(row, "completion")


def _messages(row: Row) -> list[dict]:
    messages = row.data["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{row.where}: field 'messages' must be a list of at least 2 messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.where}: field 'messages[{i}]' must have string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{row.where}: field 'messages[{len(messages) - 1}].role' must be 'assistant'")
    if not messages[-1]["content"].strip():
        raise DataError(f"{row.where}: field 'messages[{len(messages) - 1}].content' is empty")
    return messages


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    # A chat template already writes any BOS; plain text gets the tokenizer's special tokens.
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit_length(prompt_ids: list[int], completion_ids: list[int], max_length: int, policy: str,
               where: str, report: LengthReport) -> tuple[list[int], list[int]] | None:
    """Apply the over-long policy; None means the row is skipped (and counted)."""
    total = len(prompt_ids) + len(completion_ids)
    if total <= max_length:
        return prompt_ids, completion_ids
    if policy == "error":
        raise DataError(
            f"{where}: {total} tokens (prompt {len(prompt_ids)} + completion {len(completion_ids)}) "
            f"exceed max_length={max_length}; raise max_length or set overlong=truncate or overlong=skip"
        )
    if policy == "skip" or len(prompt_ids) >= max_length:
        if not report.skipped or report.skipped[-1] != where:  # one count per row
            report.skipped.append(where)
        return None
    report.truncated += 1
    return prompt_ids, completion_ids[: max_length - len(prompt_ids)]


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    prompt_len: int


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens (the loss targets)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def encode_sft(rows: list[Row], tokenizer, max_length: int, overlong: str = "error") -> tuple[list[SFTExample], LengthReport]:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    report, examples = LengthReport(rows=len(rows)), []
    for row in rows:
        prompt, completion = sft_texts(row, tokenizer)
        prompt_ids, completion_ids = encode_prompt(tokenizer, prompt, chat="messages" in row.data), \
            encode_completion(tokenizer, completion)
        report.note_unknown(tokenizer, prompt_ids + completion_ids, row.where)
        fitted = fit_length(prompt_ids, completion_ids, max_length, overlong, row.where, report)
        if fitted is not None:
            p, c = fitted
            examples.append(SFTExample(p + c, len(p)))
    if not examples:
        raise DataError(f"no usable rows left after the length policy ({report.summary()})")
    return examples, report


def check_prompt_row(row: Row) -> None:
    """A prompt row has a non-empty ``prompt`` or well-formed chat ``messages``."""
    if "messages" in row.data:
        messages = row.data["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{row.where}: field 'messages' must be a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{row.where}: field 'messages[{i}]' must have string 'role' and 'content'")
    else:
        get_str(row, "prompt")


def check_prompts(rows: list[Row], tokenizer, required=(), reserved=()) -> LengthReport:
    """Validate prompt rows (GRPO, PPO) before any model loads: a ``prompt`` or ``messages`` each,
    every field the rewards read (``required``) and none named like a reward argument (``reserved``)."""
    from .rows import check_fields

    check_fields(rows, required, reserved, why=" (a reward reads it)")
    for row in rows:
        check_prompt_row(row)
    report = LengthReport(rows=len(rows))
    texts = [prompt_text(r, tokenizer) for r in rows]
    for row, ids in zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        report.note_unknown(tokenizer, ids, row.where)
    return report


def to_device(batch, device):
    """``batch`` (a dataclass) with every tensor field on ``device``; the same object on the CPU."""
    if str(device) == "cpu":
        return batch
    moved = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
             if torch.is_tensor(getattr(batch, f.name))}
    return dataclasses.replace(batch, **moved)


def collate_sft(examples: list[SFTExample], pad_id: int) -> SFTBatch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    completion = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        completion[i, e.prompt_len:n] = 1
    return SFTBatch(input_ids, attention, completion)
