"""Held-out exact-match accuracy from greedy answers."""

from __future__ import annotations

from ..data.encode import encode_prompt, prompt_text
from ..data.rows import DataError, Row
from ..data.task import extract_answer
from .sampler import decode, sample


def reference_answer(row: Row) -> int:
    """The expected answer: the row's ``answer`` field, else the one its reference completion gives."""
    if "answer" in row.data:
        try:
            return int(row.data["answer"])
        except (TypeError, ValueError):
            raise DataError(f"{row.where}: field 'answer' must be an integer, got {row.data['answer']!r}") from None
    for field in ("completion", "chosen"):
        if isinstance(row.data.get(field), str):
            value = extract_answer(row.data[field])
            if value is not None:
                return value
    raise DataError(f"{row.where}: no 'answer' field and no reference completion to read one from")


def greedy_completions(model, tokenizer, rows: list[Row], max_new_tokens: int = 32, batch_size: int = 256) -> list[str]:
    texts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        prompts = [encode_prompt(tokenizer, prompt_text(r, tokenizer), chat="messages" in r.data) for r in chunk]
        samples = sample(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                         max_new_tokens=max_new_tokens, temperature=0.0)
        texts.extend(decode(tokenizer, samples))
    return texts


def accuracy_of(completions: list[str], rows: list[Row]) -> dict:
    """{"accuracy": fraction of completions whose answer is exactly the row's, "n": rows}."""
    right = sum(extract_answer(c) == reference_answer(r) for c, r in zip(completions, rows))
    return {"accuracy": right / len(rows), "n": len(rows)}


def exact_match(model, tokenizer, rows: list[Row], max_new_tokens: int = 32) -> dict:
    """Accuracy of the model's greedy answers on ``rows``."""
    return accuracy_of(greedy_completions(model, tokenizer, rows, max_new_tokens), rows)
