"""Turning validated rows into token ids: prompts, completions, length policy, SFT batches.

Rows come in TRL's formats (data/formats.py), plain text or chat. A chat field is rendered by
the tokenizer's chat template: the prompt with the template's generation prompt, an answer as
the template writes the assistant turn (ending with its own end token, ``<|im_end|>``, ...).
Plain completions end with the EOS id, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from .formats import (
    TAKEN_BY,
    check_messages,
    is_chat,
    require_format,
    row_format,
    row_template_kwargs,
    row_tools,
    shared_prefix,
)
from .rows import DataError, Row, get_str

OVERLONG_POLICIES = ("error", "truncate", "skip")
# the way out of an over-long row, for a config (overlong=...) and for ``rlhfkit eval`` (--overlong ...)
OVERLONG_HINT = "raise max_length, or set overlong=truncate or overlong=skip (rlhfkit eval: --overlong)"


@dataclass
class LengthReport:
    """What the length policy did; printed and logged, never silent."""

    rows: int = 0
    truncated: int = 0  # rows, not completions: a ranking with three cut answers counts once
    skipped: list[str] = field(default_factory=list)  # where of each skipped row
    unknown: list[str] = field(default_factory=list)  # where of each row with text the tokenizer maps to <unk>
    identical: int = 0  # of the skipped: rows whose answers truncation made identical
    longest: tuple[int, str] = (0, "")  # the longest sequence kept (tokens) and its row's where
    by_turn: list[str] = field(default_factory=list)  # where of each conversation trained turn by turn (SFT)
    turns_skipped: int = 0  # of those kept, the assistant turns the length policy skipped

    def note_length(self, tokens: int, where: str) -> None:
        if tokens > self.longest[0]:
            self.longest = (tokens, where)

    def summary(self) -> str:
        text = f"{self.rows} rows, {self.truncated} truncated, {len(self.skipped)} skipped"
        if self.identical:
            text += f" ({self.identical} because truncation left two of their answers identical)"
        if self.unknown:
            text += (f"; warning: {len(self.unknown)} rows hold text the tokenizer maps to its unknown token "
                     f"(first: {self.unknown[0]})")
        if self.by_turn:
            text += (f"; {len(self.by_turn)} conversations trained turn by turn, one example per assistant turn after "
                     f"the turns before it, as the model sees them (first: {self.by_turn[0]}): the chat template "
                     "writes earlier turns otherwise once later ones follow (Qwen3's drops their think blocks)")
            if self.turns_skipped:
                text += f", {self.turns_skipped} of their turns skipped by the length policy"
        return text

    def note_unknown(self, tokenizer, ids: list[int], where: str) -> None:
        unk = tokenizer.unk_token_id
        if unk is not None and unk in ids and (not self.unknown or self.unknown[-1] != where):
            self.unknown.append(where)


def render_chat(tokenizer, messages: list[dict], row: Row, field: str, generation_prompt: bool | str) -> str:
    """``messages`` as the tokenizer's chat template writes them; a one-line error without one.
    ``generation_prompt``: True opens the assistant's turn; "continue" leaves the final
    (assistant) message open, for the answer to continue it."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{row.where}: field '{field}' holds chat messages but the tokenizer has no chat template; "
                        "pass a tokenizer that has one (tokenizer=PATH) or plain-text rows")
    import jinja2

    tools = row_tools(row)  # the row's tool schemas, written where the template writes them
    prefill = generation_prompt == "continue"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt and not prefill,
                                             continue_final_message=prefill, **row_template_kwargs(row),
                                             **({"tools": tools} if tools is not None else {}))
    except (jinja2.TemplateError, TypeError, KeyError, ValueError, AttributeError) as e:  # the template's own raise too
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{row.where}: field '{field}': the tokenizer's chat template cannot render these messages "
                        f"({type(e).__name__}: {first})") from None


def assistant_text(tokenizer, context: list[dict], turn: list[dict], row: Row, field: str) -> tuple[str, bool]:
    """What the chat template renders for ``turn`` after ``context``, and whether an EOS id must
    follow it. The turn's trained end is the template's own (``<|im_end|>``, ...): the text is
    cut just after the tokenizer's EOS token where the template writes it; a template that
    writes none gets the EOS id appended, so that the model still learns to stop."""
    roles = sorted({str(m.get("role")) for m in turn} - {"assistant", "tool"})
    if roles:
        raise DataError(f"{row.where}: field '{field}' holds a {roles[0]!r} message; an answer is the assistant's "
                        "(and its tools') messages; earlier turns belong in the prompt")
    before = render_chat(tokenizer, context, row, field, generation_prompt=True)
    full = render_chat(tokenizer, context + turn, row, field, generation_prompt=False)
    text = full[len(before):] if full.startswith(before) else sampled_answer(tokenizer, context, turn, before, full,
                                                                             row, field)
    eos = tokenizer.eos_token
    end = text.rfind(eos) if eos else -1
    return (text[: end + len(eos)], False) if end >= 0 else (text.rstrip(), True)


STAND_IN = "rlhfkit-answer-5e1f"  # a content no template rewrites: where it lands, the turn's own text lies


def sampled_answer(tokenizer, context: list[dict], turn: list[dict], before: str, full: str, row: Row,
                   field: str) -> str:
    """The answer's text where the generation prompt is no start of the finished turn: DeepSeek-R1's
    template opens an answer with "<think>\n" but writes a finished turn without it, and without
    the reasoning before "</think>" (QwQ's strips the newlines after it too). The answer is the
    message as it is sampled after the generation prompt: its content, less what the generation
    prompt already holds of it (the reasoning kept), then the turn's end as the template writes
    it (read from the turn rendered around a stand-in content). A turn without one text content
    (tool calls, several messages) is what follows the two renderings' shared start. Refused: the
    context itself rendered otherwise, or a finished turn that writes something else than the
    content's end."""
    context_text = render_chat(tokenizer, context, row, field, generation_prompt=False)
    if not (before.startswith(context_text) and full.startswith(context_text)):
        raise DataError(f"{row.where}: field '{field}': the chat template does not render the conversation as "
                        "its prompt followed by the answer, so the answer's tokens cannot be told apart")
    opened, written = before[len(context_text):], full[len(context_text):]  # the generation prompt; the turn
    content = turn[0].get("content") if len(turn) == 1 and isinstance(turn[0], dict) else None
    frame = (render_chat(tokenizer, context + [{**turn[0], "content": STAND_IN}], row, field, False)[len(context_text):]
             if isinstance(content, str) and content.strip() else "")
    warning = f"rlhfkit: the chat template's generation prompt {opened!r} is no start of the finished answer it writes"
    if frame.count(STAND_IN) != 1:  # the turn's header, from a plain assistant message written around the stand-in
        plain = render_chat(tokenizer, context + [{"role": "assistant", "content": STAND_IN}], row, field, False)
        head = plain[len(context_text):].split(STAND_IN)[0] if plain.count(STAND_IN) == 1 else None
        if head is None or not (written.startswith(head) and opened.startswith(head)):
            raise DataError(f"{row.where}: field '{field}': the chat template does not render the conversation as "
                            "its prompt followed by the answer, so the answer's tokens cannot be told apart")
        answer = written[len(head):]
        if not answer.replace(tokenizer.eos_token or "", "").strip():
            raise DataError(f"{row.where}: field '{field}': the chat template writes nothing of this answer but its "
                            "end (an empty content beside tool calls it does not render?)")
        warnings.warn(f"{warning}; answers are trained after it, as they are sampled", stacklevel=3)
        return answer
    header, trailer = frame.split(STAND_IN)
    shown = (written[len(header): len(written) - len(trailer)] if len(written) >= len(header) + len(trailer)
             and written.startswith(header) and written.endswith(trailer) else None)
    if shown is None or not content.strip().endswith(shown.strip()):
        raise DataError(f"{row.where}: field '{field}': the chat template writes the finished answer otherwise than "
                        "its content and its generation prompt is no start of it, so the answer's tokens cannot be "
                        "told apart")
    extra = opened[len(header):] if opened.startswith(header) else ""  # what the prompt adds: "<think>\n"
    held = extra if content.startswith(extra) else ""
    warnings.warn(f"{warning}; answers are trained after it, as they are sampled"
                  + (f" (the content after {held!r}, which the prompt holds)" if held else ""), stacklevel=3)
    return content[len(held):] + trailer


def _conversation(row: Row) -> list[dict]:
    return check_messages(row, "messages", row.data["messages"], min_len=1)


def chat_prompt(row: Row) -> list[dict] | None:
    """The messages a chat row's answer follows (None for plain text rows)."""
    d = row.data
    if row_format(row) == "implicit_preference" and is_chat(d.get("chosen")):
        prompt = shared_prefix(d["chosen"], d["rejected"])[0]
        if not prompt and isinstance(d.get("prompt"), str):
            raise DataError(f"{row.where}: field 'chosen' holds chat messages but the prompt is plain text; "
                            "write both as chat messages or both as text")
        if not prompt:
            raise DataError(f"{row.where}: fields 'chosen' and 'rejected' share no leading message, so the pair has "
                            "no prompt; put the prompt's messages in a 'prompt' field")
        last = prompt[-1] if isinstance(prompt[-1], dict) else {}
        if isinstance(d.get("prompt"), str) and (last.get("role") != "user" or not isinstance(last.get("content"), str)
                                                 or last["content"].strip() != d["prompt"].strip()):
            raise DataError(f"{row.where}: field 'prompt' is plain text beside 'chosen' and 'rejected' as whole "
                            "conversations, whose shared messages are then the prompt (as in TRL), but their last "
                            "user message is not the 'prompt' text; write the prompt as chat messages")
        return prompt
    if is_chat(d.get("prompt")):
        return check_messages(row, "prompt", d["prompt"])
    if "messages" in d and "prompt" not in d:
        messages = _conversation(row)
        return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages
    return None


def prompt_text(row: Row, tokenizer) -> str:
    """The prompt of a plain or chat row, as the model sees it (a chat prompt ends with the
    template's generation prompt, so it needs no empty assistant turn)."""
    messages = chat_prompt(row)
    if messages is not None:
        field = next(f for f in ("prompt", "messages", "chosen") if f in row.data)  # "chosen": an implicit pair's
        # a prompt ending with the start of the assistant's answer (a prefill) is continued, as TRL renders it
        prefill = field == "prompt" and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
        return render_chat(tokenizer, messages, row, field, "continue" if prefill else True)
    if row_format(row) == "implicit_preference":
        return shared_prefix(get_str(row, "chosen"), get_str(row, "rejected"))[0]
    return get_str(row, "prompt", allow_empty=row_format(row) == "language_modeling")


def is_chat_row(row: Row) -> bool:
    return chat_prompt(row) is not None


def encode_row_prompt(tokenizer, row: Row) -> list[int]:
    """Token ids of a row's prompt, plain or chat, as every method and reward encodes it (a chat
    prompt in ``prompt`` or ``messages``: the template's own BOS, none added)."""
    return encode_prompt(tokenizer, prompt_text(row, tokenizer), chat=is_chat_row(row))


def completion_ids(tokenizer, row: Row, field: str, completion) -> list[int]:
    """Token ids of one answer (``completion``, ``chosen``, ...): plain text + EOS, or a chat
    turn as the template renders it after the row's prompt."""
    if isinstance(completion, str):
        if not completion.strip():
            raise DataError(f"{row.where}: field '{field}' is empty")
        return encode_completion(tokenizer, completion)
    if not isinstance(completion, list):
        raise DataError(f"{row.where}: field '{field}' must be a string or a list of chat messages, "
                        f"got {type(completion).__name__}")
    turn = check_messages(row, field, completion)
    for i, m in enumerate(turn):  # as a plain answer's, an empty assistant message is refused, not trained as EOS
        if m["role"] == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_calls"):
            raise DataError(f"{row.where}: field '{field}[{i}].content' is empty")
    context = chat_prompt(row)
    if context is None:
        raise DataError(f"{row.where}: field '{field}' holds chat messages but the prompt is plain text; "
                        "write both as chat messages or both as text")
    text, eos = assistant_text(tokenizer, context, turn, row, field)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])


def answer_ids(tokenizer, row: Row, why: str = "") -> list[int]:
    """Token ids of a prompt row's own answer, the one that follows ``encode_row_prompt``'s
    prompt: a ``completion`` (plain text + EOS, or a chat turn), or the last assistant turn of a
    ``messages`` row. A DataError naming the row where it has none (``why``: the caller's reason
    for needing one, added to it)."""
    d = row.data
    if row_format(row) == "prompt_completion":
        return completion_ids(tokenizer, row, "completion", d["completion"])
    messages = _conversation(row) if "messages" in d and "prompt" not in d else None
    if not messages or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataError(f"{row.where}: no answer to read (fields present: {', '.join(sorted(d))}): a 'completion', "
                        f"or 'messages' ending with an assistant turn after the prompt's{'; ' + why if why else ''}")
    return completion_ids(tokenizer, row, "messages", messages[-1:])


SFT_FORMATS = ("language_modeling", "prompt_completion")


def sft_pieces(row: Row, tokenizer) -> tuple[list[int], list[tuple[list[int], bool]]]:
    """(prompt ids, [(ids, trained), ...]) of an SFT row. In multi-turn ``messages`` every
    assistant turn is trained (assistant-only loss) and the other turns are context."""
    d = row.data
    if row_format(row) == "prompt_only":  # most often a prompt-completion row missing its answer
        raise DataError(f"{row.where}: missing field 'completion' (fields present: {', '.join(sorted(d))}); "
                        f"a prompt-only row is {TAKEN_BY['prompt_only']} data")
    fmt = require_format(row, "sft", SFT_FORMATS)
    kept = "'prompt' and 'completion'" if fmt == "prompt_completion" else "'text'" if "text" in d else None
    stray = [f for f in ("text", "messages") if f in d and f"'{f}'" != kept] if kept else []
    if stray:  # TRL reads one and ignores the other: refused rather than left unread
        raise DataError(f"{row.where}: field '{stray[0]}' beside {kept}: a row holds one format, and one of them "
                        "would be left unread; drop one of them")
    if fmt == "prompt_completion":
        prompt = encode_row_prompt(tokenizer, row)
        return prompt, [(completion_ids(tokenizer, row, "completion", d["completion"]), True)]
    if "text" in d:
        if isinstance(d["text"], list):  # TRL's conversational language modeling has the messages in 'messages'
            raise DataError(f"{row.where}: field 'text' must be a string; a conversation of chat messages goes in "
                            "a field named 'messages'")
        return encode_prompt(tokenizer, ""), [(completion_ids(tokenizer, row, "text", d["text"]), True)]
    messages = _conversation(row)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    roles = ", ".join(dict.fromkeys(repr(m["role"]) for m in messages))
    if not turns:
        raise DataError(f"{row.where}: field 'messages' has no assistant turn after the first message to train on "
                        f"(roles: {roles})")
    first = render_chat(tokenizer, messages[: turns[0]], row, "messages", True)
    pieces, done, eos = [], first, False  # done: the text encoded so far
    end, said, content = tokenizer.eos_token or "", "", ""  # the last assistant turn's text (the last piece), content

    def followed(later: str) -> str:
        """``done``, less the EOS the last turn's text ends with where ``later`` (the rendering with the
        turns that follow it) does not write it there and the turn has ended before it (a line
        break): a template that writes the EOS at the conversation's end alone (Phi-3.5's
        "<|end|>\n<|endoftext|>"); one EOS ends the conversation instead. An EOS that is the turn's
        own end, written otherwise once a turn follows (gpt-oss's <|return|> for <|end|>), is not
        dropped: such a conversation trains turn by turn."""
        nonlocal eos
        if later.startswith(done) or not (end and said.endswith(end) and said[:-len(end)].endswith(("\n", " "))
                                          and not (content and said[:-len(end)].endswith(content))  # the template's
                                          and later.startswith(done[:-len(end)])):
            return done
        pieces[-1], eos = (tokenizer(said[:-len(end)], add_special_tokens=False)["input_ids"], True), True
        return done[:-len(end)]

    for i in turns:
        context = render_chat(tokenizer, messages[:i], row, "messages", True)
        done = followed(context)
        if not context.startswith(done):
            raise RewritesTurns(f"{row.where}: field 'messages': the chat template rewrites earlier turns (as "
                                "Qwen3's drops their reasoning and writes a think block in the last turn alone), so "
                                "the assistant turns cannot be told apart in one sequence")
        if len(context) > len(done):  # the turns between two assistant turns: context, not trained
            pieces.append((tokenizer(context[len(done):], add_special_tokens=False)["input_ids"], False))
        if not (messages[i].get("content") or "").strip() and not messages[i].get("tool_calls"):
            raise DataError(f"{row.where}: field 'messages[{i}].content' is empty")
        text, ends = assistant_text(tokenizer, messages[:i], [messages[i]], row, "messages")
        eos = eos or ends
        pieces.append((tokenizer(text, add_special_tokens=False)["input_ids"], True))
        said, content = text, messages[i].get("content") if isinstance(messages[i].get("content"), str) else ""
        done = context + text
    if turns[-1] < len(messages) - 1:  # turns after the last answer (a tool's reply, a user's): context, as TRL's
        rest = render_chat(tokenizer, messages, row, "messages", False)  # assistant-only loss keeps them untrained
        done = followed(rest)
        if not rest.startswith(done):
            raise RewritesTurns(f"{row.where}: field 'messages': the chat template rewrites earlier turns once "
                                "later ones follow, so the assistant turns cannot be told apart in one sequence")
        if rest[len(done):].strip():
            pieces.append((tokenizer(rest[len(done):].rstrip(), add_special_tokens=False)["input_ids"], False))
    ids, trained = pieces[-1]
    if eos and ids[-1:] != [tokenizer.eos_token_id]:  # a template that ends turns without the EOS (Gemma's
        pieces[-1] = (ids + [tokenizer.eos_token_id], trained)  # <end_of_turn>): one EOS ends the conversation
    return encode_prompt(tokenizer, first, chat=True), pieces


class RewritesTurns(DataError):
    """A conversation whose chat template writes its earlier turns otherwise once later ones follow."""


def turn_by_turn(row: Row, tokenizer, completion_only: bool) -> list[tuple[list[int], list[tuple[list[int], bool]]]]:
    """``sft_pieces`` of a ``messages`` row whose template rewrites earlier turns once later ones
    follow (Qwen3's writes a think block in the turn after the last user message alone): one
    (prompt, pieces) per assistant turn, the turns before it rendered as the model reads them when
    it writes that turn. Where every token is trained (``completion_only`` False), one sequence:
    the turns before the last assistant turn as the model reads them, then that turn as it writes
    it (DeepSeek-R1's whole rendering drops the last turn's reasoning too); a conversation that
    ends with another role's turn, as the template writes it whole (as TRL trains it)."""
    messages = _conversation(row)
    if not completion_only and messages[-1]["role"] != "assistant":
        eos, whole = tokenizer.eos_token, render_chat(tokenizer, messages, row, "messages", False)
        end = whole.rfind(eos) if eos else -1  # cut after the template's last EOS, or one appended
        ids = tokenizer(whole[: end + len(eos)] if end >= 0 else whole.rstrip(), add_special_tokens=False)["input_ids"]
        return [([], [(ids if end >= 0 else ids + [tokenizer.eos_token_id], True)])]
    parts = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0 or (not completion_only and i < len(messages) - 1):
            continue
        if not (m.get("content") or "").strip() and not m.get("tool_calls"):
            raise DataError(f"{row.where}: field 'messages[{i}].content' is empty")
        prompt = encode_prompt(tokenizer, render_chat(tokenizer, messages[:i], row, "messages", True), chat=True)
        text, eos = assistant_text(tokenizer, messages[:i], [m], row, "messages")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        parts.append((prompt, [(ids + [tokenizer.eos_token_id] if eos else ids, True)]))
    return parts if completion_only else [([], [(parts[0][0] + parts[0][1][0][0], True)])]


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    # A chat template already writes any BOS; plain text gets the tokenizer's special tokens.
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode_completion(tokenizer, text: str) -> list[int]:
    """A plain-text answer's ids, ending with one EOS (a text that ends with the EOS already gets
    no second one, as TRL adds it only where the text lacks it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id]


def fit_length(prompt_ids: list[int], completion_ids: list[int], max_length: int, policy: str,
               where: str, report: LengthReport, prompt_trained: bool = False,
               field: str = "completion") -> tuple[list[int], list[int]] | None:
    """Apply the over-long policy; None means the row is skipped (and counted). ``prompt_trained``:
    the prompt's tokens are targets too, so a prompt that fills ``max_length`` is cut, not skipped.
    ``field``: the answer's field, named in the error."""
    total = len(prompt_ids) + len(completion_ids)
    if total <= max_length:
        report.note_length(total, where)
        return prompt_ids, completion_ids
    if policy == "error":
        raise DataError(
            f"{where}: {total} tokens (prompt {len(prompt_ids)} + {field} {len(completion_ids)}) "
            f"exceed max_length={max_length}; {OVERLONG_HINT}"
        )
    if policy == "skip" or (len(prompt_ids) >= max_length and not prompt_trained):
        if not report.skipped or report.skipped[-1] != where:  # one count per row
            report.skipped.append(where)
        return None
    report.truncated += 1
    report.note_length(max_length, where)
    return prompt_ids[:max_length], completion_ids[: max(max_length - len(prompt_ids), 0)]


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    prompt_len: int
    loss_mask: tuple[int, ...] | None = None  # 1 on trained tokens (multi-turn chat); None = all after the prompt


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T); packed: (B, 1, T, T) bool, what each position attends to
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens (the loss targets)
    position_ids: torch.Tensor | None = None  # packed: (B, T), restarting at 0 for every sequence

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def collate_sft_packed(examples: list[SFTExample], pad_id: int, width: int) -> SFTBatch:
    """Padding-free ``collate_sft``: the sequences laid end to end in rows of at most ``width``
    tokens (first fit, longest first), each attending only to itself (a block-diagonal causal
    mask) with its own position ids, so every log-prob equals the padded batch's. A sequence's
    first token is never a target (it has no prediction in its own sequence)."""
    rows: list[list[SFTExample]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        fit = next((i for i, r in enumerate(room) if r >= n), None)
        if fit is None:
            rows.append([])
            room.append(max(width, n))
            fit = len(rows) - 1
        rows[fit].append(e)
        room[fit] -= n
    used = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), used), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), used), dtype=torch.long)
    segment = torch.full((len(rows), used), -1, dtype=torch.long)
    completion = torch.zeros((len(rows), used), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, e in enumerate(row):
            n = len(e.input_ids)
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(e.input_ids)
            positions[r, span] = torch.arange(n)
            segment[r, span] = k
            if e.loss_mask is None:
                completion[r, start + e.prompt_len: start + n] = 1
            else:
                completion[r, span] = torch.tensor(e.loss_mask)
            completion[r, start] = 0
            start += n
    causal = torch.ones(used, used, dtype=torch.bool).tril()
    attend = causal & (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    attend |= torch.eye(used, dtype=torch.bool)  # padding sees itself (no empty row)
    return SFTBatch(input_ids, attend[:, None], completion, positions)


def encode_sft(rows: list[Row], tokenizer, max_length: int, overlong: str = "error",
               completion_only: bool = True) -> tuple[list[SFTExample], LengthReport]:
    """SFT examples of the rows under the length policy. ``completion_only``: the loss is on the
    completion (in ``messages``, the assistant turns); False: on every token but the first (TRL's
    ``completion_only_loss=False``, and its default for ``messages``, ``assistant_only_loss=False``)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    report, examples = LengthReport(rows=len(rows)), []
    for row in rows:
        try:
            parts = [sft_pieces(row, tokenizer)]
        except RewritesTurns:
            parts = turn_by_turn(row, tokenizer, completion_only)
            report.by_turn.append(row.where)
        # a row's turns (trained turn by turn) are counted once: truncated if any is cut, skipped if all are
        row_report, skipped = (LengthReport() if len(parts) > 1 else report), 0
        for prompt, pieces in parts:
            rest = [t for ids, _ in pieces for t in ids]
            report.note_unknown(tokenizer, prompt + rest, row.where)
            fitted = fit_length(prompt, rest, max_length, overlong, row.where, row_report,
                                prompt_trained=not completion_only)
            if row_report is not report:
                report.note_length(*row_report.longest)
            if fitted is None:
                skipped += 1
                continue
            p, c = fitted
            mask = None
            if not completion_only:  # every token a target but the first, which nothing predicts
                examples.append(SFTExample(p + c, 1))
                continue
            if not all(trained for _, trained in pieces):  # multi-turn: only the assistant turns
                mask = tuple([0] * len(p) + [int(trained) for ids, trained in pieces for _ in ids][: len(c)])
            examples.append(SFTExample(p + c, len(p), mask))
        if row_report is not report:
            report.truncated += bool(row_report.truncated)
            if skipped == len(parts):  # every turn: the row is skipped
                report.skipped.append(row.where)
            else:
                report.turns_skipped += skipped
    if not examples:
        raise DataError(f"no usable rows left after the length policy ({report.summary()})")
    return examples, report


def check_prompt_row(row: Row) -> None:
    """A prompt row has a non-empty plain ``prompt``, or well-formed chat messages in ``prompt``
    or ``messages`` (TRL's conversational prompt-only form)."""
    field = "messages" if "prompt" not in row.data and "messages" in row.data else "prompt"
    value = row.data.get(field)
    if field == "messages" or isinstance(value, list):
        check_messages(row, field, value)
    else:
        get_str(row, "prompt")  # also: missing field 'prompt'



def check_prompts(rows: list[Row], tokenizer, required=(), reserved=(), checks=(),
                  method: str = "grpo or ppo") -> LengthReport:
    """Validate prompt rows (GRPO, PPO, distillation: ``method``) before any model loads: a ``prompt``
    or ``messages`` each, every field the rewards read (``required``), none named like a reward
    argument (``reserved``), and the values the rewards read (``checks``: each ``check(row)`` raises
    a DataError)."""
    from .rows import check_fields

    for row in rows:  # rows of another method's data: say so before their fields are read as a reward's
        require_format(row, method, ("prompt_only", "prompt_completion", "language_modeling"))
    check_fields(rows, required, reserved, why=" (a reward reads it)")
    for row in rows:
        check_prompt_row(row)
        for check in checks:
            check(row)
    report = LengthReport(rows=len(rows))
    for row in rows:
        ids = encode_row_prompt(tokenizer, row)
        report.note_unknown(tokenizer, ids, row.where)
        report.note_length(len(ids), row.where)
    return report


def to_device(batch, device):
    """``batch`` (a dataclass) with every tensor field on ``device``, also those of a batch inside
    it (KTO's); the same object on the CPU."""
    if str(device) == "cpu":
        return batch
    moved = {f.name: (value.to(device) if torch.is_tensor(value) else to_device(value, device))
             for f in dataclasses.fields(batch) if torch.is_tensor(value := getattr(batch, f.name))
             or (dataclasses.is_dataclass(value) and not isinstance(value, type))}
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
        if e.loss_mask is None:
            completion[i, e.prompt_len:n] = 1
        else:
            completion[i, :n] = torch.tensor(e.loss_mask)
    completion[:, 0] = 0  # a row's first token is never a target: nothing predicts it (as the packed rows')
    return SFTBatch(input_ids, attention, completion)


def row_chunks(n_rows: int, size: int) -> list[torch.Tensor]:
    """Index tensors of consecutive micro-batches of at most ``size`` rows (none for 0 rows)."""
    size = size or n_rows
    return [torch.arange(i, min(i + size, n_rows)) for i in range(0, n_rows, max(size, 1))]
