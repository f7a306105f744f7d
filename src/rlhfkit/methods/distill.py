"""On-policy distillation (Agarwal et al. 2024, GKD; TRL's DistillationTrainer and GKDTrainer): a
student learns a teacher's next-token distributions on answers it writes itself (and, with GKD's
``lmbda`` < 1, on the data set's or the teacher's).

Reads top to bottom, one step at a time: whose answers the step learns on is drawn (GKD's
Algorithm 1: the student's own with probability ``lmbda``, else the data set's, or with ``seq_kd``
the teacher's own samples) -> the rollout backend samples one answer per prompt from the student
(or the teacher; or the rows' answers are read) -> the student (with gradient) and the frozen
teacher (without) give their whole next-token distributions at every answer token -> the
generalized JSD between them (losses/distill.py: beta 0 forward KL, 1 reverse KL), a mean over the
step's answer tokens on every rank -> one optimizer step. The teacher is any causal LM with the
student's vocabulary (a larger model, or a policy trained further). Sampled at ``temperature``;
both distributions are of logits / temperature, as TRL's DistillationTrainer's (its GKDTrainer
compares them at temperature 1 whatever it samples at). ``lmbda=1`` (the default) is TRL's
DistillationTrainer, every answer the student's; TRL's GKDTrainer defaults to ``lmbda=0.5``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.encode import answer_ids, check_prompts, row_chunks
from ..data.formats import row_format
from ..data.rows import DataError, read_rows, source_name
from ..losses.distill import distill_loss
from ..models.forward import eval_mode, target_logits
from ..models.load import (
    ModelLoadError,
    check_shared_tokenizer,
    load_causal_lm,
    load_tokenizer,
)
from ..models.lora import Reference
from ..rollout.backend import SamplerBackend, SamplingParams, make_backend
from ..rollout.evaluate import row_prompt_ids
from ..rollout.sampler import Samples, completion_view, given_samples
from ..tasks import TASK_CHOICES
from ..train.config import (
    ConfigError,
    LoraConfig,
    RolloutConfig,
    TrainConfig,
    all_used_only_with,
    at_least,
    choice,
    positive,
    within,
)
from ..train.loop import BatchOrder, Objective, accumulate, reduce_dict
from ..train.optim import build_optimizer, build_scheduler
from ..train.run import Run, start_run
from .common import (
    OFFLINE_BATCH,
    accuracy_eval,
    check_positions,
    held_out,
    longest_prompt,
    refuse_offline_batch_fields,
    say_generation_config,
)


@dataclass(frozen=True)
class DistillConfig:
    UNREAD = OFFLINE_BATCH  # not a field: keys a config file or override may not set
    model: str = ""  # the student: the causal LM trained
    tokenizer: str | None = None
    # a causal LM folder with the student's tokenizer (TRL's teacher_model_name_or_path); from Python a model too
    teacher: str = ""
    train_data: str = ""  # prompts; with lmbda < 1 (seq_kd off) each with its answer (completion, or messages)
    eval_data: str | None = None  # held-out prompts: the accuracy of the student's greedy answers (and the teacher's)
    eval_task: str = "auto"  # auto | arithmetic | reference (tasks/)
    prompts_per_step: int = 16  # over all ranks, one answer each
    max_new_tokens: int = 16  # TRL's max_completion_length
    temperature: float = 1.0  # of the sampling and of both distributions in the loss (TRL's)
    top_k: int = 0  # of the sampling only
    top_p: float = 1.0  # of the sampling only
    beta: float = 1.0  # 0: forward KL(teacher || student); 1: reverse KL (TRL's default); between: generalized JSD
    # GKD's share of steps on the student's own answers; the others learn on the rows' answers (or the teacher's,
    # seq_kd). 1: TRL's DistillationTrainer (every answer the student's); TRL's GKDTrainer: 0.5
    lmbda: float = 1.0
    seq_kd: bool = False  # the steps off the student's answers use answers the teacher samples (sequence-level KD)
    eval_limit: int = 500  # held-out prompts used; 0 = all
    eval_max_new_tokens: int = 32
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # rollout.backend: sampler | generate | vllm
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/distill"))

    def __post_init__(self):
        within("beta", self.beta, 0, 1)
        within("lmbda", self.lmbda, 0, 1)
        if self.seq_kd and self.lmbda >= 1:
            raise ConfigError("seq_kd=true sets whose answers the steps off the student's own learn on, and lmbda=1 "
                              "(rlhfkit's default, TRL's DistillationTrainer) takes none: set lmbda < 1 (TRL's "
                              "GKDTrainer: 0.5), or leave seq_kd out")
        positive("temperature", self.temperature, " (the loss compares the distributions of logits / temperature)")
        within("top_p", self.top_p, 0, 1, open_low=True)
        choice("eval_task", self.eval_task, TASK_CHOICES)
        for key in ("prompts_per_step", "max_new_tokens", "eval_max_new_tokens"):
            at_least(key, getattr(self, key), 1)
        for key in ("top_k", "eval_limit"):
            at_least(key, getattr(self, key), 0)
        all_used_only_with(self, ("eval_limit", "eval_max_new_tokens", "eval_task", "train.eval_every"),
                           bool(self.eval_data), "held-out evaluation (eval_data)")


def load_teacher(run: Run, cfg: DistillConfig, student, tokenizer) -> tuple[torch.nn.Module, int]:
    """The frozen teacher, in eval mode, unsharded (the caller shards it), and the vocabulary
    entries the two distributions are compared over. A teacher whose folder has a tokenizer must
    have the student's, token for token (refused before any training otherwise). Heads of another
    width (Qwen2.5-7B's 152064 rows against 0.5B's 151936, both past their 151665 tokens) are
    compared over the entries both have: every token id is among them, the rest are padding rows."""
    try:
        teacher = load_causal_lm(cfg.teacher, tokenizer, cfg.train.dtype, device=run.device, copy=True)
    except ModelLoadError as e:
        raise ModelLoadError(f"config key 'teacher': {e}") from None
    teacher = teacher.eval().requires_grad_(False)
    check_shared_tokenizer(cfg.teacher, tokenizer, "teacher", "student", run.say)
    widths = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    if widths[0] != widths[1]:  # both hold every token (load_causal_lm checks the tokenizer fits each)
        run.say(f"the student's head has {widths[0]} vocabulary entries and the teacher's {widths[1]}, for "
                f"{len(tokenizer)} tokens: the distributions are compared over the first {min(widths)}")
    if widths[1] > widths[0]:  # its rows past the student's are padding: cut, so that it never samples one (seq_kd)
        teacher.resize_token_embeddings(widths[0])
    return teacher, min(widths)


# GKD's draws apart from the generators BatchOrder seeds (seed x 1000003 + epoch); the CPU generator
# reads a seed's low 32 bits, which this moves by half their range
DRAW_SALT = 1 << 31


def answer_source(step: int, cfg: DistillConfig) -> str:
    """Whose answers step ``step`` (0-based) learns on: "student" where GKD's u ~ U(0, 1) falls
    below ``lmbda``, else "teacher" (``seq_kd``) or "data" (the rows' own). u is drawn from the step
    and ``train.seed`` alone: the same on every rank, and again on a resumed run (a stream of its
    own, apart from the data order's)."""
    if cfg.lmbda >= 1:
        return "student"
    u = torch.rand((), generator=torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step + DRAW_SALT)).item()
    if u < cfg.lmbda:
        return "student"
    return "teacher" if cfg.seq_kd else "data"


def read_answers(rows, tokenizer, cfg: DistillConfig) -> list[list[int]] | None:
    """Each row's own answer as token ids, where some steps learn on them (``lmbda`` < 1, ``seq_kd``
    off): every row must have one, no longer than ``max_new_tokens`` (a DataError naming the
    row, before any model loads)."""
    if cfg.lmbda >= 1 or cfg.seq_kd:
        return None
    why = (f"lmbda={cfg.lmbda} learns some steps on the rows' own answers: give rows with answers, or set "
           "seq_kd=true (the teacher's samples) or lmbda=1 (the student's)")
    answers = [answer_ids(tokenizer, row, why) for row in rows]
    over = [i for i, a in enumerate(answers) if len(a) > cfg.max_new_tokens]
    if over:
        longest = max(over, key=lambda i: len(answers[i]))
        raise DataError(f"{rows[longest].where}: its answer is {len(answers[longest])} tokens (its end token "
                        f"included), more than "
                        f"max_new_tokens={cfg.max_new_tokens} (the longest answer a step learns on, sampled or read; "
                        f"{len(over)} of {len(rows)} rows' answers are longer): raise max_new_tokens, or leave those "
                        "rows out")
    return answers


def distill_objective(cfg: DistillConfig, teacher: Reference, samples: Samples, vocab: int) -> Objective:
    """A micro-batch (row indices into ``samples``) -> its tokens' divergences summed over the
    step's answer tokens on every rank (``totals["tokens"]``), and the metrics' shares of their means."""
    ids, attn, target = completion_view(samples)

    def loss(student, index, totals: dict):
        with torch.no_grad(), teacher() as model:
            theirs = target_logits(model, ids[index], attn[index], target[index])[:, :vocab]  # (N, V)
        mine = target_logits(student, ids[index], attn[index], target[index])[:, :vocab]
        value, sums = distill_loss(mine, theirs, cfg.beta, cfg.temperature, totals["tokens"])
        return value, {k: v / totals["tokens"] for k, v in sums.items()}

    return Objective(lambda index: {"tokens": float(samples.completion_mask[index].sum())}, loss)


def distill_step(run: Run, student, teacher: Reference, samples: Samples, cfg: DistillConfig,
                 vocab: int | None = None) -> dict:
    """One optimizer step on this rank's answers, ``train.micro_batch_size`` rows a forward (the
    offline methods' ``accumulate``). Returns the loss and grad norm (over all ranks) and the
    metrics' shares of their global means. ``vocab``: the entries compared (``load_teacher``)."""
    objective = distill_objective(cfg, teacher, samples, vocab or student.get_output_embeddings().weight.shape[0])
    chunks = row_chunks(samples.completion_ids.shape[0], cfg.train.micro_batch_size)
    totals = reduce_dict({"tokens": sum(objective.counts(index)["tokens"] for index in chunks)}, run.info)
    totals["tokens"] = max(totals["tokens"], 1.0)
    loss, shares = accumulate(student, chunks, objective, totals, cfg.train.dtype, run.device)
    total, grad_norm = run.optimizer_step(loss)
    return {"shares": shares, "loss": total, "grad_norm": grad_norm}


def run_distill(cfg: DistillConfig, backend=None) -> dict:
    """Distil ``teacher`` into ``model``. Python callers may pass a rollout backend object of their
    own (rollout/backend.py) in place of ``rollout.backend``'s."""
    for key in ("model", "teacher", "train_data"):
        if getattr(cfg, key) is None or (isinstance(getattr(cfg, key), str) and not getattr(cfg, key).strip()):
            raise ConfigError(f"config key '{key}' is required")
    refuse_offline_batch_fields("distill", cfg.train)
    tc = cfg.train
    run = start_run(tc, cfg, "distill", unit="rollout step", show=("loss",))
    if cfg.prompts_per_step % run.info.world_size:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must divide over {run.info.world_size} ranks")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    rows, eval_rows = read_rows(cfg.train_data), held_out(cfg.eval_data, cfg.eval_limit, cfg.eval_task, run.say)
    report = check_prompts(rows, tokenizer, method="distill")  # every row, before any model loads
    run.say(f"{source_name(cfg.train_data)}: {report.summary()}")
    answers = read_answers(rows, tokenizer, cfg)
    answered = sum(row_format(r) == "prompt_completion" or (row_format(r) == "language_modeling"
                                                              and "text" not in r.data) for r in rows)
    if answered and answers is None:  # TRL's DistillationTrainer reads the prompt alone too
        run.say(f"note: {answered} rows carry an answer (a completion, or assistant turns), which distillation does "
                f"not read with {'seq_kd' if cfg.seq_kd else 'lmbda=1'}: every answer is sampled")
    if isinstance(cfg.model, (str, Path)) and isinstance(cfg.teacher, (str, Path)) and \
            Path(cfg.model).resolve() == Path(cfg.teacher).resolve():
        run.say("warning: the teacher is the student's own start model: the divergence starts at 0 and the first "
                "steps have nothing to learn")
    # no router balancing loss for a mixture of experts: TRL's DistillationTrainer adds none
    student = run.prepare(load_causal_lm(cfg.model, tokenizer, device=run.device), cfg.lora,
                          base=cfg.model, dropout=False)
    teacher, vocab = load_teacher(run, cfg, student, tokenizer)
    student_wider = student.get_output_embeddings().weight.shape[0] > vocab  # its samples may be rows the teacher lacks
    for model in (student, teacher):
        check_positions(run, model, report.longest, cfg.max_new_tokens)
        check_positions(run, model, longest_prompt(eval_rows, tokenizer), cfg.eval_max_new_tokens)
    before = run.state.get("before", {})  # a resumed run keeps the start's figures
    if eval_rows is not None and not run.resuming:  # the teacher's, for comparison (on its unsharded copy)
        with eval_mode(teacher):
            result, _, _ = eval_rows.accuracy(SamplerBackend(tokenizer, teacher), tokenizer, cfg.eval_max_new_tokens)
        before = {"teacher_accuracy": result["accuracy"]}
        run.say(f"the teacher's held-out accuracy: {result['accuracy']:.4f}")
    teacher_backend = None
    if cfg.seq_kd:  # the teacher's own sampler (not a second vLLM engine), on its unsharded copy where it is sharded
        name = "sampler" if cfg.rollout.backend == "vllm" else cfg.rollout.backend
        teacher_backend = make_backend(name, tokenizer, teacher, copy=run.shards_models)
        if name != cfg.rollout.backend:
            run.say("seq_kd: the teacher samples with rlhfkit's sampler (the vLLM engine holds the student)")
    teacher = Reference(module=run.shard(teacher))
    backend = backend or make_backend(cfg.rollout, tokenizer, student, copy=run.shards_models,  # before sharding
                                      out_dir=tc.out_dir)
    run.shard(student)
    evaluate = accuracy_eval(backend, student, tokenizer, eval_rows, cfg.eval_max_new_tokens)
    if evaluate and not run.resuming:
        before["accuracy_before"] = run.start_eval(evaluate())["accuracy"]
    run.keep["before"] = before
    optimizer = build_optimizer(student, tc.lr, tc.weight_decay)
    total = run.plan(len(rows), cfg.prompts_per_step, "prompts", "prompts_per_step")
    run.attach(student, optimizer, build_scheduler(optimizer, total, tc.warmup_steps, tc.schedule, tc.min_lr_ratio))
    order = BatchOrder(len(rows), cfg.prompts_per_step, tc.seed)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    sources = [answer_source(step, cfg) for step in range(run.max_steps)]  # GKD's draws, the run's at once
    student_steps = list(itertools.accumulate(source == "student" for source in sources))
    if student_steps and student_steps[-1]:  # the student samples
        say_generation_config(run, student, tokenizer, params, cfg.model)
    if "teacher" in sources:  # seq_kd: the teacher samples too, with the run's settings and its own end ids
        say_generation_config(run, teacher_backend.model, tokenizer, params, cfg.teacher, key="teacher's config")
    for step in run.steps(evaluate):
        source = sources[step]
        picked = order.indices(step)[run.info.rank::run.info.world_size]
        prompts = row_prompt_ids(tokenizer, [rows[i] for i in picked])
        if source == "data":
            samples = given_samples(prompts, [answers[i] for i in picked], tokenizer.pad_token_id,
                                    tokenizer.eos_token_id).to(run.device)
        elif source == "teacher":
            samples = teacher_backend.generate(prompts, params)
        else:
            backend.load_weights(student)  # a sharded student: the gathered full weights into the backend's copy
            samples = backend.generate(prompts, params)
            if student_wider and int(samples.completion_ids.max()) >= vocab:  # a padding row past the teacher's
                raise RuntimeError(f"step {step + 1}: the student sampled token id {int(samples.completion_ids.max())}, "
                                   f"a padding row of its head past the teacher's {vocab} entries, which the teacher "
                                   "cannot read; give the student a head no wider than the teacher's")
        lengths = samples.completion_mask.sum(-1).double()
        out = distill_step(run, student, teacher, samples, cfg, vocab)
        means = {"loss": out["loss"], "grad_norm": out["grad_norm"], "completion_len_mean": float(lengths.mean()),
                 "student_answers": float(source == "student"),  # 1 on the student's own answers, 0 off them
                 "student_answers_share": student_steps[step] / (step + 1)}  # of the run's steps so far
        if source != "data":  # cut off at max_new_tokens without an EOS (TRL's completions/clipped_ratio)
            means["completion_clipped"] = float((~samples.finished).double().mean())
        run.step_done(means=means, shares=out["shares"], evaluate=evaluate)
    summary = {"loss": run.metrics.get("loss"), "divergence": run.metrics.get("divergence"), **before,
               "student_answers_share": run.metrics.get("student_answers_share")}
    if run.evals:
        summary.update({k: v for k, v in run.evals[-1].items() if k != "step"})
    return run.finish(student, tokenizer, summary)
