"""Preference data: pairs (prompt, chosen, rejected; or implicit: chosen, rejected sharing the
prompt as their prefix), plain or chat, and rankings (prompt, completions best first).

A pair is a ranking of two. Each output of a ranking is tokenised once and carries its rank
(lower is better; equal ranks are ties, only where the row's optional ``ranks`` field says so).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .encode import LengthReport, completion_ids, encode_row_prompt, fit_length
from .formats import check_messages, check_prompt_fields, implicit_answers, is_chat, require_format
from .rows import DataError, Row, get_str_list


@dataclass(frozen=True)
class RankingExample:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # best first
    ranks: list[int]
    ref_logps: tuple[float, ...] | None = None  # precomputed reference log-probs (DPO), one per completion
    margin: float = 0.0  # a pair's ``margin`` field (the RM's margin loss); 0 where the row has none


@dataclass
class RankingBatch:
    input_ids: torch.Tensor  # (N, T) right-padded prompt+completion, N = total outputs of the batch
    attention_mask: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) 1 on completion tokens
    slot: torch.Tensor  # (N,) flat index into the (P, K) grid: prompt * K + position
    ranks: torch.Tensor  # (P, K) rank of each output; padding slots hold K
    mask: torch.Tensor  # (P, K) 1 where a slot holds an output
    ref_logps: torch.Tensor | None = None  # (P, K) precomputed reference log-probs, when the examples carry them
    margins: torch.Tensor | None = None  # (P,) the pairs' margins, where some example has one

    @property
    def num_prompts(self) -> int:
        return self.mask.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.slot.shape[0]

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per-output values -> (P, K) grid (zeros on padding slots)."""
        return _grid(values, self.slot, self.mask)

    def output_lengths(self) -> torch.Tensor:
        """(N,) completion tokens per output that have a log-prob: all of them after a non-empty
        prompt; after an empty one the first has no predecessor and is not counted."""
        return self.completion_mask[:, 1:].sum(-1)


@dataclass
class SharedPromptBatch:
    """Rankings laid out one row each: the prompt once, then every output after it.

    An output's tokens attend to the prompt and to their own earlier tokens only (``attend``, a
    block-causal mask) and their positions continue from the prompt's end, so each output is
    computed as it is alone after its prompt, while the prompt's tokens pass through the model
    once instead of K times: for short answers after a longer prompt, most of the tokens.
    """

    input_ids: torch.Tensor  # (P, W) prompt, outputs, right padding
    position_ids: torch.Tensor  # (P, W) each output's positions continue from the prompt's end
    attend: torch.Tensor  # (P, 1, W, W) bool: query i may attend to key j
    last: torch.Tensor  # (N,) flat index into (P * W) of each output's last token, in slot order
    slot: torch.Tensor  # (N,) as RankingBatch's
    ranks: torch.Tensor  # (P, K)
    mask: torch.Tensor  # (P, K)
    # for log-probs (DPO): every output token after a non-empty prompt, M in all
    predecessor: torch.Tensor | None = None  # (M,) flat index into (P * W) of the position predicting it
    targets: torch.Tensor | None = None  # (M,) the token
    owner: torch.Tensor | None = None  # (M,) its output, 0..N-1 in slot order
    lengths: torch.Tensor | None = None  # (N,) tokens per output that have a log-prob (as RankingBatch's)
    ref_logps: torch.Tensor | None = None  # (P, K) precomputed reference log-probs, when the examples carry them
    margins: torch.Tensor | None = None  # (P,) as RankingBatch's

    @property
    def num_prompts(self) -> int:
        return self.mask.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.slot.shape[0]

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        return _grid(values, self.slot, self.mask)

    def output_lengths(self) -> torch.Tensor:
        return self.lengths


def _grid(values: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = values.new_zeros(mask.numel())
    return out.index_put((slot,), values).view_as(mask)


PREFERENCE_FORMATS = ("preference", "implicit_preference", "ranking")


def ranking_completions(row: Row, method: str = "rm and dpo") -> tuple[list, list[int]]:
    """The answers of a ranking or pair row, best first (text, or chat turns), and their ranks.
    An implicit-preference pair's answers are what follows the shared prefix of chosen and rejected."""
    fmt = require_format(row, method, PREFERENCE_FORMATS)
    if fmt == "ranking":
        completions = _ranking_answers(row)
        if len(completions) > 9:
            raise DataError(f"{row.where}: field 'completions' has {len(completions)} entries; at most 9")
        ranks = row.data.get("ranks")  # None: a parquet or datasets column where this row has no ties
        ranks = list(range(len(completions))) if ranks is None else ranks
        if (not isinstance(ranks, list) or len(ranks) != len(completions)
                or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks) or ranks != sorted(ranks)):
            raise DataError(f"{row.where}: field 'ranks' must be non-decreasing integers, one per completion")
        if ranks[0] == ranks[-1]:
            raise DataError(f"{row.where}: field 'ranks' ranks every completion equal: no preference to learn")
        return completions, ranks
    for name in ("chosen", "rejected"):
        if name not in row.data:
            raise DataError(f"{row.where}: missing field '{name}' (fields present: {', '.join(sorted(row.data))})")
        if not (isinstance(row.data[name], str) or is_chat(row.data[name])):
            raise DataError(f"{row.where}: field '{name}' must be a string or a list of chat messages")
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    if fmt == "implicit_preference":
        chosen, rejected = implicit_answers(row)
        for name, rest in (("chosen", chosen), ("rejected", rejected)):
            if not (rest.strip() if isinstance(rest, str) else rest) and row.data["chosen"] != row.data["rejected"]:
                raise DataError(f"{row.where}: field '{name}' has nothing after the prompt that 'chosen' and "
                                "'rejected' share (the whole of it is the start of the other): give the prompt in a "
                                "'prompt' field, or answers that differ")
    if chosen == rejected:
        raise DataError(f"{row.where}: fields 'chosen' and 'rejected' are the same text")
    return [chosen, rejected], [0, 1]


def _ranking_answers(row: Row) -> list:
    """A ranking's answers: distinct non-empty strings or, conversational, chat turns (each a list of
    messages after a chat prompt, as a pair's ``chosen`` is), all of one kind."""
    value = row.data.get("completions")
    if not (isinstance(value, list) and any(isinstance(v, list) for v in value)):
        return get_str_list(row, "completions", min_len=2)
    if not all(isinstance(v, list) for v in value):
        raise DataError(f"{row.where}: field 'completions' mixes text and chat messages; give every answer as text "
                        "or every answer as a list of messages")
    if len(value) < 2:
        raise DataError(f"{row.where}: field 'completions' needs at least 2 entries, got {len(value)}")
    for i, turn in enumerate(value):
        check_messages(row, f"completions[{i}]", turn)
    seen = [json.dumps(turn, sort_keys=True) for turn in value]
    if len(set(seen)) != len(seen):
        i = next(i for i, key in enumerate(seen) if seen.count(key) > 1)
        raise DataError(f"{row.where}: field 'completions' lists the answer of 'completions[{i}]' more than once")
    return value


def encode_rankings(rows: list[Row], tokenizer, max_length: int, overlong: str = "error", method: str = "rm and dpo"):
    check_prompt_fields(rows)
    report, examples, encoded = LengthReport(rows=len(rows)), [], {}
    for row in rows:
        completions, ranks = ranking_completions(row, method)
        prompt_ids = encode_row_prompt(tokenizer, row)
        names = ["chosen", "rejected"] if len(completions) == 2 and "completions" not in row.data else \
            [f"completions[{i}]" for i in range(len(completions))]
        ids = [_cached(encoded, c, lambda: completion_ids(tokenizer, row, name, c)) for name, c in zip(names, completions)]
        report.note_unknown(tokenizer, prompt_ids + [t for c in ids for t in c], row.where)
        row_report = LengthReport()
        fitted = [fit_length(prompt_ids, c, max_length, overlong, row.where, row_report, field=name)
                  for name, c in zip(names, ids)]
        if any(f is None for f in fitted):
            report.skipped.append(row.where)
            continue  # skipped (and counted) as a whole: a ranking with a hole would change its pairs
        kept = [c for _, c in fitted]
        if len({tuple(c) for c in kept}) < len(kept):
            # Truncation cut two answers to the same tokens: the validator refuses such rows on
            # input (no preference to learn between them), so they are skipped and counted.
            report.skipped.append(row.where)
            report.identical += 1
            continue
        report.truncated += row_report.truncated > 0  # counts are per row, not per completion
        report.note_length(*row_report.longest)
        examples.append(RankingExample(prompt_ids, kept, ranks, margin=row_margin(row, len(kept)) if method == "rm"
                                       else 0.0))
    if not examples:
        raise DataError(f"no usable rows left after the length policy ({report.summary()})")
    return examples, report


def _cached(encoded: dict, completion, encode):
    """Plain-text answers repeat across rows (the same " 55" in many rankings): tokenise each once.
    Chat answers depend on their prompt and are always encoded."""
    if not isinstance(completion, str):
        return encode()
    if completion not in encoded:
        encoded[completion] = encode()
    return list(encoded[completion])


def collate_rankings(examples: list[RankingExample], pad_id: int) -> RankingBatch:
    k = max(len(e.completion_ids) for e in examples)
    seqs = [(e.prompt_ids, c) for e in examples for c in e.completion_ids]
    width = max(len(p) + len(c) for p, c in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width), dtype=torch.long)
    slot = torch.zeros(n, dtype=torch.long)
    ranks = torch.full((len(examples), k), k, dtype=torch.long)
    mask = torch.zeros((len(examples), k), dtype=torch.long)
    i = 0
    for p, e in enumerate(examples):
        for j, c in enumerate(e.completion_ids):
            ids = e.prompt_ids + c
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            completion[i, len(e.prompt_ids): len(ids)] = 1
            slot[i] = p * k + j
            i += 1
        ranks[p, : len(e.ranks)] = torch.tensor(e.ranks)
        mask[p, : len(e.ranks)] = 1
    return RankingBatch(input_ids, attention, completion, slot, ranks, mask, _reference_grid(examples, k),
                        _margins(examples))


def collate_shared_prompt(examples: list[RankingExample], pad_id: int, read_pad_id: int | None = -1) -> SharedPromptBatch:
    """The ``SharedPromptBatch`` layout of ``examples`` (outputs in the same order as ``collate_rankings``).

    ``last`` is where a sequence classifier reads the output's score in its own row (models/reward.py
    ``score_index``): its rightmost token that is not ``read_pad_id`` (the model config's pad id;
    -1: ``pad_id``; None: the last token). With pad = eos that is the token before the final EOS."""
    read_pad_id = pad_id if read_pad_id == -1 else read_pad_id
    k = max(len(e.completion_ids) for e in examples)
    width = max(len(e.prompt_ids) + sum(map(len, e.completion_ids)) for e in examples)
    rows_ids, rows_pos, rows_seg = [], [], []
    last, slot, lengths, places = [], [], [], []  # places: (predecessor, target, owner)
    for p, e in enumerate(examples):
        n_prompt = len(e.prompt_ids)
        ids, pos, seg = list(e.prompt_ids), list(range(n_prompt)), [0] * n_prompt
        for j, c in enumerate(e.completion_ids):
            before = n_prompt - 1  # an output's first token is predicted at the prompt's last position
            for t in c:
                if before >= 0:  # after an empty prompt the first token has no prediction (as in a row of its own)
                    places.append((p * width + before, t, len(slot)))
                before = len(ids)
                ids.append(t)
            pos += range(n_prompt, n_prompt + len(c))
            seg += [j + 1] * len(c)
            last.append(p * width + _score_position(ids, n_prompt, len(c), read_pad_id))
            slot.append(p * k + j)
            lengths.append(len(c) - (n_prompt == 0))
        rows_ids.append(ids), rows_pos.append(pos), rows_seg.append(seg)
    input_ids, positions = pad_right(rows_ids, pad_id, width), pad_right(rows_pos, 0, width)
    segment = pad_right(rows_seg, -1, width)  # 0 prompt, j + 1 output j, -1 padding
    ranks = pad_right([e.ranks for e in examples], k, k)  # outputs a prompt lacks: ranked K, masked out
    mask = pad_right([[1] * len(e.ranks) for e in examples], 0, k)
    predecessor, targets, owner = (torch.tensor(places, dtype=torch.long).t().contiguous() if places else
                                   torch.zeros((3, 0), dtype=torch.long))
    last_t, slot_t, lengths_t = (torch.tensor(v, dtype=torch.long) for v in (last, slot, lengths))
    return SharedPromptBatch(input_ids, positions, block_causal_mask(segment)[:, None], last_t, slot_t, ranks, mask,
                             predecessor, targets, owner, lengths_t,
                             _reference_grid(examples, k), _margins(examples))


def _score_position(ids: list[int], n_prompt: int, n_output: int, read_pad_id: int | None) -> int:
    """The position of the last output appended to ``ids`` (after its prompt's ``n_prompt`` tokens)
    where its own row ``prompt + output`` would be read: the rightmost token that is not
    ``read_pad_id``, in the output or else in the prompt (position 0 if none, as ``argmax`` gives)."""
    row = list(range(n_prompt)) + list(range(len(ids) - n_output, len(ids)))
    if read_pad_id is None:
        return row[-1] if row else 0
    return next((i for i in reversed(row) if ids[i] != read_pad_id), 0)


def _reference_grid(examples: list[RankingExample], k: int) -> torch.Tensor | None:
    """(P, K) precomputed reference log-probs when every example carries them, else None."""
    if not all(e.ref_logps is not None for e in examples):
        return None
    return pad_right([e.ref_logps for e in examples], 0.0, k, dtype=None)  # a float tensor of the default dtype


def _margins(examples: list[RankingExample]) -> torch.Tensor | None:
    """(P,) the examples' margins where some has one, else None (the paper's loss)."""
    if not any(e.margin for e in examples):
        return None
    return torch.tensor([e.margin for e in examples])


def row_margin(row: Row, outputs: int) -> float:
    """A pair row's ``margin`` (TRL's RewardTrainer column): a finite number (negative, as TRL
    allows, asks for less than a win), or 0 without one."""
    value = row.data.get("margin")
    if value is None:
        return 0.0
    if outputs != 2:
        raise DataError(f"{row.where}: field 'margin' applies to (chosen, rejected) pairs, not to a ranking of "
                        f"{outputs}")
    if isinstance(value, str):  # a CSV cell ("1.5"): every value there is text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{row.where}: field 'margin' must be a finite number, got {value!r}")
    return float(value)


def pad_right(rows: list, fill, width: int, dtype: torch.dtype | None = torch.long,
              device: torch.device | None = None) -> torch.Tensor:
    """(len(rows), width): each row (a sequence of numbers) followed by ``fill`` up to ``width``, built
    with one ``torch.tensor`` call (``dtype`` None: inferred, as ``torch.tensor`` does)."""
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=dtype,
                        device=device).view(len(rows), width)


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, W, W) bool, query i may attend to key j, for rows of segments (B, W): 0 a shared prompt,
    k > 0 the k-th continuation of it, -1 padding. Causal; a continuation sees the prompt and
    itself, not the other continuations; a padding position sees itself only (no empty row: NaN)."""
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]  # (B, W, 1), (B, 1, W)
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    attend = causal & (query >= 0) & ((key == 0) | (key == query))
    return attend | torch.eye(width, dtype=torch.bool, device=segment.device)


def count_pairs(batch: RankingBatch | SharedPromptBatch) -> int:
    r, m = batch.ranks, batch.mask.bool()
    return int(((r[:, :, None] < r[:, None, :]) & m[:, :, None] & m[:, None, :]).sum())
