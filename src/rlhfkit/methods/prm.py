"""Process reward model: a score for every step of a solution (Lightman et al. 2023).

Data: TRL's stepwise supervision (``prompt``, ``completions`` = the steps, ``labels`` = one bool
per step), plain or conversational (data/steps.py). The steps are joined with
``step_separator`` written after each one; a scalar (or two-class) head is read at the last token
of each separator and trained with the per-step binary cross-entropy of losses/prm.py.

Reads top to bottom: config -> data -> model -> objective -> the shared loop -> save a
``...ForTokenClassification`` folder (the separator stored in its config.json as
``step_separator``, which GRPO's ``process_reward=prm:PATH`` reads). A token classifier fits
because a PRM is one: it scores positions of a sequence, and plain transformers loads it and
gives the same logits at those positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.encode import OVERLONG_POLICIES, to_device
from ..data.rows import read_rows, source_name
from ..data.steps import collate_steps, encode_step_rows
from ..losses.prm import step_bce_loss
from ..models.forward import eval_mode
from ..models.load import load_tokenizer
from ..models.reward import (
    PRM_SETTINGS_FILE,
    STEP_READOUTS,
    is_likelihood_prm,
    load_process_reward_model,
    prm_settings_file,
    score_name,
    step_logits,
)
from ..train.config import (
    ConfigError,
    LoraConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    choice,
    used_only_with,
    within,
)
from ..train.loop import Objective, train_offline
from ..train.run import start_run
from .common import check_positions, head, longest


@dataclass(frozen=True)
class PRMConfig:
    model: str = ""  # the SFT causal-LM folder, or a token-classifier folder
    tokenizer: str | None = None
    train_data: str = ""  # step-labelled rows: prompt, completions (steps), labels
    eval_data: str | None = None
    step_separator: str = "\n"  # written after every step; the scores are read at its last token
    num_labels: int = 1  # 1: a scalar logit per step; 2: two classes (as TRL's PRMTrainer), logit = l1 - l0
    # head: a score head read at each separator (a token classifier). likelihood: the causal LM's own
    # lowest token log-prob in the step minus step_logprob_floor (README, issue #14); num_labels unused
    readout: str = "head"
    step_logprob_floor: float = -3.0  # likelihood: a step whose every token has log p above it is judged right
    max_length: int = 128
    overlong: str = "error"  # error | truncate (after the last whole step that fits) | skip
    # TRL's: train each row's last step's label alone (the steps before it are context; a row cut by overlong
    # loses its last step and is skipped); the held-out metrics still judge every step
    train_on_last_step_only: bool = False
    eval_limit: int = 500  # held-out rows used; 0 = all
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the backbone; the step head trains in full
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/prm"))

    def __post_init__(self):
        choice("overlong", self.overlong, OVERLONG_POLICIES)
        choice("num_labels", self.num_labels, (1, 2))
        choice("readout", self.readout, STEP_READOUTS)
        at_least("max_length", self.max_length, 2)
        at_least("eval_limit", self.eval_limit, 0)
        all_used_only_with(self, ("eval_limit", "train.eval_every"), bool(self.eval_data), "held-out evaluation (eval_data)")
        within("step_logprob_floor", self.step_logprob_floor, float("-inf"), 0.0, open_low=True)  # finite, <= 0
        used_only_with("num_labels", self.num_labels, PRMConfig.num_labels, self.readout == "head", "readout=head")
        used_only_with("step_logprob_floor", self.step_logprob_floor, PRMConfig.step_logprob_floor,
                       self.readout == "likelihood", "readout=likelihood")
        if not self.step_separator:
            raise ConfigError("config key 'step_separator' must not be empty (the scores are read at its tokens)")
        if self.readout == "head" and self.model and Path(self.model).is_dir() and is_likelihood_prm(self.model):
            raise ConfigError(f"{self.model} is a PRM with the likelihood read-out (no score head); readout=likelihood "
                              "continues it")


def prm_objective() -> Objective:
    def counts(batch) -> dict:
        return {"steps": batch.labels.numel()}

    def loss(model, batch, totals):
        logits = step_logits(model, batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols,
                             batch.step_spans)  # (N,)
        value, sums = step_bce_loss(logits, batch.labels, totals["steps"])
        return value, {"step_accuracy": sums["correct"] / max(totals["steps"], 1.0)}

    return Objective(counts, loss)


def step_stats(judged_right: list[list[bool]], labels: list[tuple[bool, ...]]) -> dict:
    """Held-out PRM metrics from per-step judgements (True: the model says the step is right).

    ``step_accuracy`` over all steps; precision, recall and ``wrong_step_f1`` with the wrong step
    as the positive class (finding wrong steps is what a PRM is for); ``first_error_accuracy``:
    the first step judged wrong (or none) is the first wrong step (or none), per solution.
    ``position_only_accuracy``: the step accuracy of the best rule that sees only a step's index
    (the majority label at each index of these same labels), the bar a PRM must clear to have
    learned anything about a step's content (issue #14: 0.700 against 0.673 from position alone).
    """
    pairs = [(j, y) for js, ys in zip(judged_right, labels) for j, y in zip(js, ys)]
    caught = sum(not j and not y for j, y in pairs)
    flagged, wrong = sum(not j for j, _ in pairs), sum(not y for _, y in pairs)
    precision, recall = caught / max(flagged, 1), caught / max(wrong, 1)

    def first_error(values) -> int:
        return next((i for i, v in enumerate(values) if not v), len(values))

    return {"step_accuracy": sum(j == y for j, y in pairs) / max(len(pairs), 1),
            "wrong_step_precision": precision, "wrong_step_recall": recall,
            "wrong_step_f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "first_error_accuracy": sum(first_error(js) == first_error(ys) for js, ys in zip(judged_right, labels))
            / max(len(labels), 1),
            "position_only_accuracy": position_only_accuracy(labels), "scored_steps": len(pairs)}


def position_only_accuracy(labels: list[tuple[bool, ...]]) -> float:
    """Step accuracy of judging every step by the majority label at its index (ties: right)."""
    counts: dict[int, list[int]] = {}
    for ys in labels:
        for i, y in enumerate(ys):
            counts.setdefault(i, [0, 0])[int(y)] += 1
    return sum(max(c) for c in counts.values()) / max(sum(sum(c) for c in counts.values()), 1)


def step_metrics(model, examples, pad_id: int, batch_size: int = 64) -> dict:
    """``step_stats`` of ``model`` on held-out step-labelled examples (a step is judged right at p > 0.5)."""
    judged = []
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            batch = to_device(collate_steps(chunk, pad_id), next(model.parameters()).device)
            right = step_logits(model, batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_cols,
                                batch.step_spans) > 0
            flat = right.tolist()
            for e in chunk:
                judged.append(flat[: len(e.positions)])
                flat = flat[len(e.positions):]
    return step_stats(judged, [e.labels for e in examples])


def run_prm(cfg: PRMConfig) -> dict:
    run = start_run(cfg.train, cfg, "prm")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    examples, report = encode_step_rows(read_rows(cfg.train_data), tokenizer, cfg.step_separator, cfg.max_length,
                                        cfg.overlong, last_step_only=cfg.train_on_last_step_only)
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    held_out, eval_report = [], None
    if cfg.eval_data:
        rows = head(read_rows(cfg.eval_data), cfg.eval_limit, run.say, cfg.eval_data)
        held_out, eval_report = encode_step_rows(rows, tokenizer, cfg.step_separator, cfg.max_length, "skip")
        run.say(f"{source_name(cfg.eval_data)} (held out, over-long rows skipped): {eval_report.summary()}")
    model = load_process_reward_model(cfg.model, tokenizer, cfg.num_labels, seed=cfg.train.seed, device=run.device,
                                      readout=cfg.readout)
    check_positions(run, model, longest(report, eval_report))
    model.config.step_separator = cfg.step_separator  # saved in config.json: where GRPO reads the steps
    if cfg.readout == "likelihood":  # saved too: GRPO's prm:PATH reads the steps the same way
        model.config.step_readout, model.config.step_logprob_floor = "likelihood", cfg.step_logprob_floor
    trained_head = score_name(model) if cfg.readout == "head" else None  # a likelihood PRM has none
    run.shard(run.prepare(model, cfg.lora, head=trained_head, base=cfg.model))
    evaluate = (lambda m: step_metrics(m, held_out, tokenizer.pad_token_id)) if held_out else None
    train_offline(run, model, examples, lambda rows: collate_steps(rows, tokenizer.pad_token_id), prm_objective(),
                  evaluate)
    summary = {"loss": run.metrics.get("loss"), "length_report": report.summary()}
    if run.evals:
        summary.update({k: run.evals[-1][k] for k in ("step_accuracy", "position_only_accuracy", "wrong_step_f1",
                                                       "first_error_accuracy")})
    # a LoRA adapter has no config.json: the steps' settings are saved beside it (in the folder, or in
    # its adapter/ when the merged model is the folder), written with it before it is published
    adapter = f"{'adapter/' if run.merge else ''}{PRM_SETTINGS_FILE}"
    files = {adapter: prm_settings_file(model.config)} if cfg.lora.enabled else None
    return run.finish(model, tokenizer, summary, files)
