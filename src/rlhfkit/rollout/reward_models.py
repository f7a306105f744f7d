"""Learned rewards: a reward model as an outcome reward (``rm:PATH``), a process reward model as
a process reward (``prm:PATH``).

Each holds a frozen model and, once per rollout step, is bound to the step's samples and prompt
rows (``bind(samples, rows)``, one row per sample), which gives a callable with the signature of
rollout/rewards.py: the models need what the policy saw (the rendered prompt) and the reward
model the sampled tokens themselves.

Tokenizers: a model folder's own tokenizer is used (the policy's when the folder has none).
When it is the policy's, the reward model scores the sampled ids as they are; when it differs,
the prompt is rendered and the completion text re-tokenised for it (``retokenise``, logged as
``reward/<name>_retokenised``). The PRM always reads text: it splits each completion at its
separator and builds ``prompt, step_1, sep, ..., step_n, sep`` exactly as it was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.encode import chat_prompt, completion_ids, encode_row_prompt, is_chat_row, row_chunks, to_device
from ..data.formats import completion_text
from ..data.rows import DataError, Row
from ..data.steps import (
    StepExample,
    char_to_token_index,
    collate_steps,
    encode_steps,
    separator_ids,
    split_steps,
)
from ..models.load import TOKENIZER_FILES, load_tokenizer
from ..models.reward import load_process_reward_model, load_reward_model, reward_scores, step_logits
from .sampler import Samples, as_trained_on, left_pad


def own_tokenizer(path: str, policy_tokenizer):
    """The tokenizer in the model folder, else the policy's."""
    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(path)
    return policy_tokenizer


def check_renders(learned, rows: list[Row]) -> None:
    """A learned reward that reads the prompts as text (a PRM; a reward model with a tokenizer of
    its own) renders a chat prompt with its own tokenizer: one it cannot render (no chat template)
    is refused before training, naming the model's folder, not at the first step's scores."""
    chat = next((row for row in rows if is_chat_row(row)), None)
    if chat is None or not learned.reads_text:
        return
    if not getattr(learned.tokenizer, "chat_template", None):
        raise DataError(f"{learned.path}: this reward model reads the prompts with its own tokenizer, which has no chat "
                        f"template, and the prompts are chat messages ({chat.where}); save the tokenizer it was "
                        "trained with (its chat template) into the folder")
    try:
        encode_row_prompt(learned.tokenizer, chat)
    except DataError as e:
        raise DataError(f"{learned.path}: this reward model's own tokenizer cannot render the prompts: {e}") from None


class RewardModelReward:
    """An outcome reward: r(x, y) of a ``...ForSequenceClassification`` folder (e.g. ``rlhfkit rm``)."""

    def __init__(self, path: str, policy_tokenizer, device: str = "cpu", name: str = "rm", rows_per_forward: int = 0):
        self.tokenizer, self.rows_per_forward = own_tokenizer(path, policy_tokenizer), rows_per_forward
        self.retokenise = self.tokenizer.get_vocab() != policy_tokenizer.get_vocab()
        self.path, self.reads_text = path, self.retokenise  # the same vocabulary: it scores the sampled ids
        self.model = load_reward_model(path, self.tokenizer, device=device).eval().requires_grad_(False)
        self.__name__ = name

    def bind(self, samples: Samples, rows: list[Row]):
        def score(prompts, completions, **_) -> list[float]:
            return self.score(samples, rows, [completion_text(c) for c in completions])

        score.__name__ = self.__name__
        return score

    @torch.no_grad()
    def score(self, samples: Samples, rows: list[Row], completions: list[str]) -> list[float]:
        if not self.retokenise:
            return self._scores(*as_trained_on(samples, self.tokenizer.eos_token_id))
        tok = self.tokenizer
        seqs = [encode_row_prompt(tok, row) + self._answer_ids(row, text, finished)
                for row, text, finished in zip(rows, completions, samples.finished.tolist())]
        ids, mask = left_pad(seqs, tok.pad_token_id)
        device = next(self.model.parameters()).device
        return self._scores(ids.to(device), mask.to(device))

    def _scores(self, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
        return reward_scores(self.model, ids, mask, self.rows_per_forward).tolist()

    def _answer_ids(self, row: Row, text: str, finished: bool) -> list[int]:
        """A decoded answer in the reward model's own tokens, as its training data encoded answers: a
        finished one to a chat prompt as its template writes the assistant's turn (its turn end, and
        an EOS where the template writes none), a finished plain one with the EOS; a cut-off answer,
        or one continuing a prefilled assistant message, is its text (with the EOS where finished)."""
        tok = self.tokenizer
        plain = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
        context = chat_prompt(row) if finished and text.strip() else None
        if context is None or context[-1].get("role") == "assistant":
            return plain
        try:
            return completion_ids(tok, row, "completion", [{"role": "assistant", "content": text}])
        except DataError:  # a template that cannot write it as a turn: the text and the EOS
            return plain


class ProcessRewardModelReward:
    """A process reward: the probability a ``...ForTokenClassification`` PRM (``rlhfkit prm``) gives
    that each step is right, read at the separator after the step. Steps are the completion split
    at the separator stored in the folder's config (``step_separator``; beside a LoRA adapter, in
    its prm_settings.json; "\\n", TRL's default, for a PRM trained elsewhere); each step ends,
    for the policy's advantages, at the token that holds its last character. An answer with no
    step (no text, or nothing but separators) has one step, judged wrong (0.0), as
    ``arithmetic_steps`` judges it: it has no tokens of a step to score (a likelihood readout's
    lowest log-prob over none would be +inf, a probability of 1)."""

    def __init__(self, path: str, policy_tokenizer, device: str = "cpu", rows_per_forward: int = 0):
        self.tokenizer, self.rows_per_forward = own_tokenizer(path, policy_tokenizer), rows_per_forward
        self.path, self.reads_text = path, True
        self.model = load_process_reward_model(path, self.tokenizer, device=device).eval().requires_grad_(False)
        self.separator = getattr(self.model.config, "step_separator", None) or "\n"
        self.sep_ids = separator_ids(self.tokenizer, self.separator)
        self.__name__ = "prm"

    def bind(self, samples: Samples, rows: list[Row]):
        def prm(prompts, completions, completion_ids=None, tokenizer=None, **_) -> list[list[tuple[int, float]]]:
            return self.score(rows, [completion_text(c) for c in completions], completion_ids, tokenizer)

        return prm

    @torch.no_grad()
    def score(self, rows: list[Row], completions: list[str], completion_ids: list[list[int]],
              policy_tokenizer) -> list[list[tuple[int, float]]]:
        examples, ends, blank = [], [], []
        for row, text, ids in zip(rows, completions, completion_ids):
            steps = split_steps(text, self.separator)  # a text without the separator is one step
            blank.append(not steps)
            if blank[-1]:
                continue
            input_ids, positions, spans = encode_steps(self.tokenizer, encode_row_prompt(self.tokenizer, row),
                                                [s for s, _ in steps], self.sep_ids)
            examples.append(StepExample(input_ids, positions, (), spans))
            ends.append([char_to_token_index(policy_tokenizer, ids, end) for _, end in steps])
        probs = []
        for chunk in row_chunks(len(examples), self.rows_per_forward):  # rows_per_forward at a time (0: all)
            batch = to_device(collate_steps([examples[i] for i in chunk.tolist()], self.tokenizer.pad_token_id),
                              next(self.model.parameters()).device)
            probs += torch.sigmoid(step_logits(self.model, batch.input_ids, batch.attention_mask, batch.step_rows,
                                               batch.step_cols, batch.step_spans)).tolist()
        out, scored = [], iter(ends)
        for empty, ids in zip(blank, completion_ids):
            if empty:
                out.append([(max(len(ids) - 1, 0), 0.0)])
                continue
            step_ends = next(scored)
            out.append(list(zip(step_ends, probs[: len(step_ends)])))
            probs = probs[len(step_ends):]
        return out
