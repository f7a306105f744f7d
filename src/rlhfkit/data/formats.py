"""TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats), read as they are.

Each row is one of these, told apart by its fields; any text field may instead be a list of
``{"role", "content"}`` messages (the conversational form), rendered by the tokenizer's chat
template:

    language modeling     text  |  messages                         SFT
    prompt-only           prompt (+ fields rewards read)            GRPO, PPO
    prompt-completion     prompt, completion                        SFT
    preference            prompt, chosen, rejected                  RM, DPO, KTO (two unpaired answers)
    implicit preference   chosen, rejected (shared prefix = prompt) RM, DPO, KTO
    ranking (rlhfkit)     prompt, completions best first [, ranks]  RM, DPO
    unpaired preference   prompt, completion, label                 KTO
    stepwise supervision  prompt, completions, labels               a process reward model (PRM)

A method given a format it does not take refuses it, naming the method that does: an unpaired
row's ``label`` would otherwise be ignored and a false-labelled answer trained on, and stepwise
rows would be read as a ranking.
"""

from __future__ import annotations

import json
import unicodedata

from .rows import DataError, Row, is_chat

FORMAT_NAMES = {
    "language_modeling": "language-modeling (text / messages)",
    "prompt_only": "prompt-only (a 'prompt' without 'completion')",
    "prompt_completion": "prompt-completion",
    "preference": "preference (prompt, chosen, rejected)",
    "implicit_preference": "implicit-preference (chosen, rejected)",
    "ranking": "ranking (prompt, completions)",
    "unpaired_preference": "unpaired-preference (prompt, completion, label)",
    "stepwise": "stepwise-supervision (prompt, completions, labels)",
}
TAKEN_BY = {
    "language_modeling": "sft", "prompt_completion": "sft",
    "prompt_only": "grpo, rloo, ppo, online_dpo and distill",
    "preference": "rm, dpo (cpo, orpo) and kto", "implicit_preference": "rm, dpo (cpo, orpo) and kto",
    "ranking": "rm and dpo",
    "unpaired_preference": "kto (for sft keep the rows whose label is true and drop 'label')",
    "stepwise": "prm (a process reward model)",
}


def row_format(row: Row) -> str:
    """Which of the formats above ``row`` is, from its fields."""
    d = row.data
    if "labels" in d and "completions" in d:
        return "stepwise"
    if "label" in d and "completion" in d:
        return "unpaired_preference"
    if "chosen" in d or "rejected" in d:  # a text prompt beside whole conversations: their shared start is it (TRL's)
        explicit = "prompt" in d and not (isinstance(d["prompt"], str) and is_chat(d.get("chosen")))
        return "preference" if explicit else "implicit_preference"
    if "completions" in d:
        return "ranking"
    if "completion" in d:
        return "prompt_completion"
    if "text" in d or ("messages" in d and "prompt" not in d):
        return "language_modeling"
    return "prompt_only"


MEDIA_FIELDS = ("images", "image", "videos", "video", "audio")  # TRL's vision-language columns, and kin


def require_format(row: Row, method: str, accepted: tuple[str, ...]) -> str:
    """``row``'s format, or a DataError saying which method takes it; also for what the row holds
    that its text would be trained or sampled without (images; tool schemas beside plain text)."""
    fmt = row_format(row)
    if fmt not in accepted:
        article = "an" if FORMAT_NAMES[fmt][0] in "aeiou" else "a"
        hint = ""
        if fmt == "ranking" and "stepwise" in accepted:
            hint = "; a stepwise row has 'labels' beside 'completions', one per step (missing here)"
        elif fmt == "ranking" and "prompt_only" in accepted:
            hint = ("; a field named 'completions' makes a row a ranking: in a prompt row rename it (reward "
                    "functions get the sampled answers under that name)")
        raise DataError(f"{row.where}: {article} {FORMAT_NAMES[fmt]} row is not {method} data; "
                        f"that format is for {TAKEN_BY[fmt]}{hint}")
    media = [f for f in MEDIA_FIELDS if row.data.get(f) not in (None, [])]
    if media:
        raise DataError(f"{row.where}: field '{media[0]}': rlhfkit trains text models and has no image or audio "
                        "processor; drop the column to train on the text alone")
    for field in ("tools", "chat_template_kwargs"):
        if row.data.get(field) is not None and not any(is_chat(v) for v in row.data.values()):
            raise DataError(f"{row.where}: field '{field}' goes to a chat template, and this row's text is plain; "
                            f"write the row as chat messages or drop '{field}'")
    return fmt


def answer_text(value) -> str | None:
    """An answer as text: a string, or the content of a chat list's final assistant message
    (TRL's conversational ``completion``); None for anything else."""
    if isinstance(value, str):
        return value
    if is_chat(value) and value[-1].get("role") == "assistant" and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    return None


def check_messages(row: Row, field: str, messages, min_len: int = 1) -> list[dict]:
    if not isinstance(messages, list) or len(messages) < min_len:
        raise DataError(f"{row.where}: field '{field}' must be a list of at least {min_len} message(s)")
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise DataError(f"{row.where}: field '{field}[{i}]' must have string 'role' and 'content' "
                            "(an assistant message with 'tool_calls' may leave 'content' out)")
    return messages


def row_tools(row: Row) -> list | None:
    """The row's ``tools`` (TRL's tool-calling form: function schemas the chat template renders),
    a list of objects or a JSON string of one; None without them."""
    tools = row.data.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{row.where}: field 'tools' is a string but not valid JSON ({e.msg})") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{row.where}: field 'tools' must be a list of function schemas (objects)")
    return tools


def row_template_kwargs(row: Row) -> dict:
    """The row's ``chat_template_kwargs`` (TRL's per-row column: variables its chat template reads,
    as Qwen3's ``enable_thinking``); {} without them."""
    kwargs = row.data.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise DataError(f"{row.where}: field 'chat_template_kwargs' is a string but not valid JSON ({e.msg})") \
                from None
    if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
        raise DataError(f"{row.where}: field 'chat_template_kwargs' must be an object of template variables "
                        "(e.g. {\"enable_thinking\": false})")
    taken = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize"})
    if taken:
        raise DataError(f"{row.where}: field 'chat_template_kwargs' sets {taken[0]!r}, which rlhfkit sets itself")
    return {k: v for k, v in kwargs.items() if v is not None}  # parquet's struct columns fill absent keys with None


def completion_text(completion) -> str:
    """A completion as reward functions get it, as text: the text itself, or the content of the
    assistant message(s) it comes as where the prompts are chat messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


def user_prompt(row: Row):
    """The prompt as the user wrote it, for reward functions: the ``prompt`` field (text or
    messages), or a ``messages`` conversation without its final assistant answer."""
    if "prompt" in row.data:
        return row.data["prompt"]
    messages = row.data.get("messages")
    if is_chat(messages):
        return messages[:-1] if messages[-1].get("role") == "assistant" and len(messages) > 1 else messages
    return ""


def implicit_answers(row: Row) -> tuple:
    """(chosen, rejected) after the prompt an implicit-preference pair's two fields share; a text
    pair sharing no leading text has no prompt, and is refused as a chat pair sharing no message is."""
    prompt, chosen, rejected = shared_prefix(row.data["chosen"], row.data["rejected"])
    if not prompt and isinstance(row.data["chosen"], str):
        raise DataError(f"{row.where}: fields 'chosen' and 'rejected' share no leading text, so the pair has no "
                        "prompt; put the prompt in a 'prompt' field")
    return chosen, rejected


def check_prompt_fields(rows: list) -> None:
    """A file of pairs reads a row without ``prompt`` as an implicit pair (the prompt the two answers'
    shared start) only where no other row has one: in a file of explicit pairs it is a row missing its
    prompt (a null or empty cell of a table too), whose split would train part of an answer as prompt."""
    explicit = next((r for r in rows if row_format(r) == "preference"), None)
    implicit = next((r for r in rows if row_format(r) == "implicit_preference"), None)
    if explicit is not None and implicit is not None and "prompt" in implicit.data:  # a text prompt, chat answers
        raise DataError(f"{implicit.where}: field 'prompt' is plain text and 'chosen' holds chat messages, which reads "
                        "the pair as two whole conversations (TRL's form beside a text prompt), while other rows of "
                        f"this data are pairs after their prompt ({explicit.where}); write the row's prompt and "
                        "answers alike, all as chat messages or all as text")
    if explicit is not None and implicit is not None:
        raise DataError(f"{implicit.where}: missing field 'prompt' (fields present: {', '.join(sorted(implicit.data))}), "
                        f"which other rows of this data have ({explicit.where}); a pair without one is read as an "
                        "implicit pair, its prompt the start both answers share, only where every pair is")


# scripts written without spaces between words: a pair's split stays by character there
UNSPACED = ("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def _in_word(text: str, i: int) -> bool:
    """Whether ``text[i]`` belongs to a word or number ("3.14", "1,250": the separator between
    digits) of a script that spaces its words (not Chinese, Japanese, Thai, ...)."""
    c = text[i]
    if c.isalnum():
        return c.isascii() or not unicodedata.name(c, "").startswith(UNSPACED)
    return c in ".," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()


def shared_prefix(chosen, rejected):
    """(prompt, chosen rest, rejected rest) of an implicit-preference pair: the longest common
    prefix (of characters, or of whole messages) is the prompt. For text, a split inside a word or
    number (its "." and "," between digits included) moves back to its start
    ("Assistant: S" + "ure" / "orry" would train tokens the model never samples after
    "Assistant:", and keep the telling " Sure" against " Sorry" out of the answers; TRL's
    ``extract_prompt`` splits there), and a space just before the split stays with the answers, as
    TRL's keeps it. A pair that shares nothing before that word, and text without spaces between
    words (Chinese, Japanese, Thai), keep the character split."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n < min(len(chosen), len(rejected)) and (_in_word(chosen, n)
                                                                           or _in_word(rejected, n)):
        start = n  # both go on, and the split is inside a word: back to its start
        while start > 0 and _in_word(chosen, start - 1):
            start -= 1
        n = start or n
    if isinstance(chosen, str) and 0 < n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]
