"""The run skeleton every method calls: set-up, the optimizer step, the log / eval / save cadence.

A method's loop reads::

    run = start_run(cfg.train, cfg, "grpo", unit="rollout step")   # before any model loads
    ... load models, build the optimizer ...
    run.attach(trained, optimizer, scheduler)                     # broadcast, seed, resume
    for step in run.steps(eval_fn):                                # a resumed run settles its eval first
        ... loss.backward() ...
        loss_value, grad_norm = run.optimizer_step(loss)          # NaN/inf checks, then the step
        run.step_done(means={...}, shares={...}, evaluate=eval_fn)
    return run.finish(model, tokenizer, summary)

so that every method behaves the same: the out-dir check, seeding, exact resume, the NaN/inf
check on the loss (summed over ranks, so every rank stops together) and on the gradient norm
before the optimizer step, metrics reduced over ranks before rank 0 logs them, checkpoints
written by every rank and completed by rank 0, followed by a barrier, and a progress bar that names its unit.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..models.card import write_model_card
from ..models.forward import balancing_loss
from ..models.kernels import (
    NEVER,
    decode_kernel,
    kernel_choices,
    layout_min_new_tokens,
    linear_kernel,
    onednn_linear_available,
    pin_kernels,
    use_fast_linear,
)
from ..models.lean import forget_prepared
from ..models.load import disable_dropout, is_sharded, stored_dtype
from ..models.lora import (
    LoraSettings,
    apply_lora,
    enable_activation_checkpointing,
    is_adapter_folder,
    start_adapter,
    unmergeable,
)
from ..models.memory import keep_freed_memory
from .checkpoint import (
    CheckpointError,
    amend_checkpoint,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    publish_folder,
    restore_set_aside,
    save_checkpoint,
    write_failure,
)
from .config import LENGTH_KEYS, ConfigError, LoraConfig, TrainConfig, plain_dict, resume_changes
from .dist import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    broadcast_params,
    init_distributed,
)
from .logging import EVAL_SAMPLES, MetricsLogger, plain_tree, progress, truncate_metrics
from .optim import check_finite, hyperparameters, optimizer_step, rebase_schedule
from .plots import plot_runs
from .shard import save_everywhere, shard


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_out_dir(cfg: TrainConfig, info: DistInfo) -> bool:
    """Refuse to write a new run over one that has a complete checkpoint (or finished);
    ``resume=true`` and ``resume=auto`` resume from the last complete checkpoint. A folder with
    no complete checkpoint (a run killed before its first save) holds nothing to keep or resume:
    every setting starts afresh there, and says so. Returns whether it resumes."""
    out = Path(cfg.out_dir)
    found = latest_checkpoint(out) is not None
    if cfg.resume is False and (found or (out / "result.json").exists()):
        raise CheckpointError(f"{out} already holds a run; pass train.resume=true to continue it or pick another "
                              "out_dir")
    barrier(info)
    if info.is_main and not found and (cfg.resume or (out / "metrics.jsonl").exists() or (out / EVAL_SAMPLES).exists()):
        print(f"{out}: no complete checkpoint to resume from; starting afresh", file=sys.stderr)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / EVAL_SAMPLES).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)  # its events too: no step is shown twice
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in sorted(checkpoint_dir(out).glob("step-*.tmp*")):  # a save that never completed
            print(f"removing {stale}: an incomplete checkpoint of an earlier run", file=sys.stderr)
            shutil.rmtree(stale, ignore_errors=True)
        for stale in sorted(checkpoint_dir(out).glob("step-*/*.tmp")):  # an amend killed before its rename
            print(f"removing {stale}: a file an interrupted checkpoint amend left half-written", file=sys.stderr)
            stale.unlink(missing_ok=True)
        for aside in restore_set_aside(out):  # a run killed between a model folder's two renames
            print(f"{aside}: the model folder an interrupted save had set aside, put back", file=sys.stderr)
    barrier(info)
    return bool(cfg.resume) and found


def split_batch(cfg: TrainConfig, info: DistInfo) -> tuple[int, int]:
    """(rows per rank, rows per micro-batch), checking that the global batch divides evenly."""
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"config key 'train.batch_size' ({cfg.batch_size}) must divide evenly over "
                          f"{info.world_size} ranks")
    per_rank = cfg.batch_size // info.world_size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"config key 'train.micro_batch_size': the per-rank batch {per_rank} must be a multiple "
                          f"of it; got {micro}")
    return per_rank, micro


def reduce_metrics(means: dict, shares: dict, info: DistInfo) -> dict[str, float]:
    """One collective: ``means`` (each rank's own estimate) averaged over ranks, ``shares`` (each
    rank's part of a global quantity, already divided by global counts) summed over ranks."""
    keys = sorted(means) + sorted(shares)
    flat = torch.tensor([float(means[k]) for k in sorted(means)] + [float(shares[k]) for k in sorted(shares)],
                        dtype=torch.float64)
    all_reduce_sum(flat, info)
    flat[: len(means)] /= info.world_size
    return dict(zip(keys, flat.tolist()))


@dataclass
class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived: the step was finished and a complete checkpoint written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


RUN_STATE = {"step", "world_size", "optimizer_steps", "metrics", "evals", "stopped_early", "pending_eval",  # Run's own
             "step_logged", "rng_after_eval", "log_window", "interim_line"}
# metrics a logged line gives as they stand at its step, not averaged over the steps since the last line
# kl_coef: PPO's; student_answers_share: GKD's; entropy_coef: GRPO's adaptive control
AS_THEY_STAND = ("lr", "optimizer_steps", "kl_coef", "student_answers_share", "entropy_coef")


def window_means(window: list[dict]) -> dict:
    """One logged line for the steps since the last (TRL's ``logging_steps``): each metric's mean
    over the steps that have it (NaN ones left out, as a step where every reward abstained), the
    largest of a ``*_max`` and the smallest of a ``*_min``, and ``AS_THEY_STAND`` from the last
    step. Keys in the last step's order, then any it lacks (a skipped update's grad_norm)."""
    last = window[-1]
    keys = list(last) + [k for k in dict.fromkeys(k for m in window for k in m) if k not in last]
    line = {}
    for k in keys:
        values = [m[k] for m in window if k in m]
        present = [v for v in values if v == v]
        if k in AS_THEY_STAND or not present:
            line[k] = values[-1]
        elif k.endswith("_max"):
            line[k] = max(present)
        elif k.endswith("_min"):
            line[k] = min(present)
        else:
            line[k] = sum(present) / len(present)
    return line


@dataclass
class Run:
    cfg: TrainConfig
    config: dict  # the resolved config, as plain values (what config.yaml holds)
    info: DistInfo
    name: str
    unit: str  # what one of max_steps counts: "optimizer step" or "rollout step"
    resuming: bool = False  # train.resume resolved (auto: a complete checkpoint was there)
    show: tuple[str, ...] = ("loss",)  # metrics shown on the progress bar
    max_steps: int = 0  # train.max_steps, or the steps train.epochs makes (``plan``)
    start: int = 0
    done: int = 0
    optimizer_steps: int = 0
    state: dict = field(default_factory=dict)  # the trainer state of the checkpoint resumed from
    resumed_from: Path | None = None  # that checkpoint's folder
    keep: dict = field(default_factory=dict)  # a method's values saved with every checkpoint (back in ``state``)
    evals: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # the last step's, reduced over ranks
    window: list = field(default_factory=list)  # each step's metrics since the last logged line (``window_means``)
    stopped_early: bool = False
    modules: tuple = ()  # (trained module, optimizer, scheduler) once attached
    kept: dict = field(default_factory=dict)  # untrained modules the checkpoints hold too (TR-DPO's reference)
    logger: MetricsLogger | None = None
    bar: object = None
    merge: bool = False  # LoRA: save the merged model beside the adapter (lora.merge)
    said: set = field(default_factory=set)  # warnings said once a run, though several models meet them
    lr: float | None = None  # the learning rate of the last optimizer step
    signal: int | None = None  # SIGTERM / SIGINT received during the steps: stop after this step
    held: dict = field(default_factory=dict)  # the signal handlers steps() replaced
    finishing: bool = False  # in ``finish``: a signal waits for the final model folder
    router_coef: float = 0.0  # the weight of a mixture of experts' balancing loss (``prepare``)

    def __post_init__(self):
        keep_freed_memory()  # steps reuse their activations' memory instead of page-faulting it in (memory.py)
        if self.resuming:  # readable before the modules are (``attach`` loads them)
            self.state = json.loads((latest_checkpoint(self.cfg.out_dir) / "trainer_state.json").read_text())
        if self.device == "cpu":
            self.say(kernel_line(self.pin_kernels()))

    def pin_kernels(self) -> str:
        """The kernels this run takes on a CPU: on resume those of the run it resumes (in its
        checkpoint), else rank 0's timing on every rank, so that a resumed run computes as the
        straight one and the ranks alike. Returns how they were chosen, for the log."""
        if self.resuming and self.state.get("kernels"):
            pin_kernels(self.state["kernels"])
            return "as the run resumed chose"
        if self.info.enabled:
            pin_kernels(broadcast_object(kernel_choices() if self.info.is_main else None, self.info))
            return "as rank 0 timed"
        return ""

    def say(self, message: str, every_rank: bool = False) -> None:
        """``message`` on stderr, from rank 0; ``every_rank``: from whichever rank says it (named
        where there are several), for what one rank alone saw."""
        if self.info.is_main or every_rank:
            where = f" (rank {self.info.rank})" if every_rank and self.info.world_size > 1 else ""
            text = f"{self.name}{where}: {message}"
            if self.bar is not None:  # a line of its own, the progress bar redrawn below it
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)

    @property
    def sharded(self) -> bool:
        """Checkpoints in the sharded (DCP) format: ``train.strategy=fsdp``, on any number of ranks."""
        return self.cfg.strategy == "fsdp"

    @property
    def shards_models(self) -> bool:
        """Models are really split: ``fsdp`` on more than one rank (copies must be made first)."""
        return self.sharded and self.info.enabled

    @property
    def device(self) -> str:
        return self.info.device

    def router_balance_coef(self, model, adds: bool, base=None) -> float:
        """The weight of ``model``'s router load-balancing loss (models/forward.py ``balancing_loss``):
        ``train.router_aux_loss_coef``, or where unset the model config's own, as TRL's SFT, DPO and
        GRPO add it; 0 for a method that does not add it (``adds`` False), where an explicit setting is
        refused and a config asking for it (``output_router_logits``) is told it is not added."""
        spec, asked = balancing_loss(model), self.cfg.router_aux_loss_coef
        what = f"the model from {base}" if isinstance(base, (str, Path)) else f"the {type(model).__name__}"
        if asked and not adds:
            raise ConfigError(f"train.router_aux_loss_coef={asked}: {self.name} does not add a router balancing loss "
                              "(SFT, DPO and GRPO do, as TRL's); leave it out")
        if asked and spec is None:
            raise ConfigError(f"train.router_aux_loss_coef={asked} but {what} is not a mixture of experts with "
                              "transformers' router load-balancing loss; leave it out")
        coef = (spec[3] if asked is None else asked) if spec is not None else 0.0
        if coef and adds:
            self.say(f"{what} is a mixture of experts: its router's load-balancing loss is added with coefficient "
                     f"{coef:g} (train.router_aux_loss_coef; 0 turns it off), logged as router_aux_loss")
            return coef
        config = model.config.get_text_config()
        wanted = getattr(config, "router_aux_loss_coef", 0) if getattr(config, "output_router_logits", False) else 0
        if wanted and asked is None and (spec is None or not adds):
            why = (f"{self.name} does not add it, as TRL's does not" if not adds else
                   "its modeling file has no load-balancing loss of transformers' usual form, so it is not added")
            self.say(f"warning: {what} is a mixture of experts with output_router_logits=true and "
                     f"router_aux_loss_coef={wanted}; {why}")
        return 0.0

    def prepare(self, model: torch.nn.Module, lora: LoraConfig | None = None, head: str | None = None,
                base=None, router_loss: bool = False, dropout: bool = True) -> torch.nn.Module:
        """A model to train, made ready before it is copied or sharded: LoRA adapters when
        ``lora.r > 0`` (``head``: a scalar head trained in full; ``base``: the folder it came from)
        and activation checkpointing when ``train.activation_checkpointing``. ``router_loss``: the
        method adds a mixture of experts' balancing loss (``router_coef``, said here).
        ``dropout=False``: the method trains with every dropout off (``disable_dropout``), the
        adapters' ``lora.dropout`` too, as TRL's ``disable_dropout`` turns off peft's; a
        ``lora.dropout`` above 0 is then said to be off, not kept silently."""
        if not dropout and lora is not None and lora.enabled and lora.dropout > 0 and "lora.dropout" not in self.said:
            self.said.add("lora.dropout")  # PPO's actor and critic: one line
            self.say(f"warning: lora.dropout={lora.dropout:g} is not applied: this method trains with every "
                     "dropout off, the adapters' too (as TRL's disable_dropout)")
        if not (lora is not None and lora.enabled) and not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model object has no trainable weight (requires_grad is False on every one, as "
                              "peft's merge_and_unload leaves them): call model.requires_grad_(True) first, or pass "
                              "its saved folder")
        self.router_coef = self.router_balance_coef(model, router_loss, base)
        stored = stored_dtype(base)
        if stored in ("bfloat16", "float16") and "dtype" not in self.said and not (lora is not None and lora.enabled
                                                                                 and not lora.merge):
            self.said.add("dtype")  # as TRL's default (float32 unless model_init_kwargs asks for another dtype)
            self.say(f"{base} stores {stored} weights: they train as fp32 master weights (train.dtype=bf16 "
                     "autocasts the forwards) and the model folder is saved in fp32, twice their size")
        if lora is not None and lora.enabled:
            settings = LoraSettings(lora.r, lora.alpha, lora.dropout, lora.target_modules)
            base = str(base) if isinstance(base, (str, Path)) else getattr(model, "name_or_path", None)
            if base and Path(base).is_dir():  # absolute: the adapter is loaded from other folders than this one
                base = str(Path(base).resolve())
            if is_adapter_folder(base):  # saved stacked onto the start adapter's own base (models/lora.py)
                try:
                    start_adapter(base)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.seed)  # the adapters' random start (A) is the same in every run
                model = apply_lora(model, settings, base, head)
            why = unmergeable(model) if lora.merge else None
            if why:
                raise ConfigError(f"lora.merge=true, but the adapters of lora.target_modules={lora.target_modules!r} "
                                  f"cannot be merged: {why}; set lora.merge=false (the adapter folder keeps them) "
                                  "or name other lora.target_modules")
            use_fast_linear(model)  # the adapters' own linear layers
            self.merge = lora.merge
        if not dropout:  # after the adapters are in: their own dropout layers too
            disable_dropout(model)
        if self.cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        return model

    def save_model(self, model, tokenizer, out_dir, metrics: dict | None = None, what: str = "model",
                   files: dict[str, str] | None = None, legend: list[str] = ()) -> None:
        """A ``save_pretrained`` folder (LoRA: the adapter, and the merged model with ``lora.merge``)
        with a ``README.md`` model card (``metrics``, by default the last eval's and step's) and
        ``files`` (name: text). Written beside ``out_dir`` and renamed into place when complete
        (``publish_folder``): a run killed while saving leaves the earlier folder or none."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if self.info.is_main and tmp.exists():
            shutil.rmtree(tmp)
        save_everywhere(model, tokenizer, tmp, self.info, merge=self.merge)
        if self.info.is_main:
            if metrics is None:
                metrics = {"step": self.done, **{f"train/{k}": v for k, v in self.metrics.items()},
                           **{f"eval/{k}": v for k, v in (self.evals[-1] if self.evals else {}).items() if k != "step"}}
            write_model_card(tmp, self.name, self.config, metrics, what, legend)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
            publish_folder(tmp, out_dir)
        barrier(self.info)

    def shard(self, model: torch.nn.Module, cast: bool = True) -> torch.nn.Module:
        """Spread ``model`` over the ranks as ``train.strategy`` says (train/shard.py); copy it first.
        ``cast=False``: its parameters keep their own dtype under ``train.dtype=bf16`` (a frozen
        scorer loaded in fp32 scores in fp32, as it does replicated), where FSDP2's bf16 policy
        would run its whole forward in bf16."""
        return shard(model, self.info, self.cfg.strategy, self.cfg.dtype if cast else "fp32")

    def resident_bytes(self) -> int:
        """Bytes of the trained parameters, room for their gradients, and optimizer state on this
        rank (the local shards under FSDP2)."""
        trained, optimizer, _ = self.modules

        def local(t) -> int:
            t = getattr(t, "_local_tensor", t)
            return t.numel() * t.element_size()

        state = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
        return 2 * sum(local(p) for p in trained.parameters() if p.requires_grad) + state

    def plan(self, rows: int, per_step: int, what: str = "rows", key: str = "train.batch_size") -> int:
        """The number of steps to run: ``train.epochs`` passes over ``rows`` training rows (or
        ``what``: KTO's answers), ``per_step`` of them a step (the setting ``key``), when epochs is
        set; else ``train.max_steps``. More a step than there are is said: every step then holds
        some of them twice or more (no step is short of ``per_step``, where TRL's would be)."""
        if per_step > rows:
            self.say(f"warning: {key}={per_step} is more than the {rows} {what} of the training data: every step "
                     f"holds some of them more than once")
        if self.cfg.epochs > 0:
            self.max_steps = max(1, math.ceil(self.cfg.epochs * rows / per_step))
            self.say(f"epochs={self.cfg.epochs:g} over {rows} {what}, {per_step} a step: {self.max_steps} {self.unit}s")
            if self.cfg.max_steps != TrainConfig.max_steps:  # TRL's max_steps would win over its epochs
                self.say(f"warning: train.epochs wins over train.max_steps={self.cfg.max_steps}, which is not read "
                         "(in TRL max_steps > 0 overrides num_train_epochs)")
        return self.max_steps

    def attach(self, trained: torch.nn.Module, optimizer, scheduler, kept: dict | None = None) -> None:
        """Start every rank from rank 0's weights, seed, and restore the last checkpoint on resume.
        ``kept``: untrained modules the checkpoints hold too (``save_checkpoint``), by name."""
        self.modules, self.kept = (trained, optimizer, scheduler), kept or {}
        if not is_sharded(trained):  # sharded weights were loaded alike on every rank before sharding
            broadcast_params(trained, self.info)
        seed_everything(self.cfg.seed + self.info.rank)  # ranks sample (and drop out) differently
        if self.resuming:
            path = self.resumed_from = latest_checkpoint(self.cfg.out_dir)
            built = hyperparameters(optimizer)
            self.state = load_checkpoint(path, trained, optimizer, scheduler, self.info, self.kept)
            rebase_schedule(optimizer, scheduler, built)  # this config's lr, decay and schedule from here
            self.start = self.done = self.state["step"]
            if self.start > self.max_steps:
                raise going_back(path, self.unit, self.start, f"this run's length ({self.max_steps} {self.unit}s)")
            self.optimizer_steps = self.state.get("optimizer_steps", 0)
            self.evals, self.metrics = self.state.get("evals", []), self.state.get("metrics", {})
            # the steps since the last line, which the next averages (non-finite values were saved as text); a
            # checkpoint from before windows has the last step's metrics alone (NaN as None), its window where
            # that step's line was not written (an eval pending), else none
            old = [self.metrics] if self.metrics and not self.state.get("step_logged", True) else []
            saved = self.state.get("log_window", old)
            self.window = [{k: float("nan") if v is None else float(v) if isinstance(v, str) else v
                            for k, v in m.items()} for m in saved]
            self.stopped_early = bool(self.state.get("stopped_early"))
            self.say(f"resuming from {path} ({self.unit} {self.start} of {self.max_steps})"
                     + ("; an eval had stopped the run there" if self.stopped_early else "")
                     + ("; the run is complete: its model folder and result.json are written again"
                        if self.start == self.max_steps else ""))
            saved_ranks = self.state.get("world_size", self.info.world_size)
            if saved_ranks != self.info.world_size and self.unit == "rollout step":
                self.say(f"note: the checkpoint was written by {saved_ranks} rank(s) and this run has "
                         f"{self.info.world_size}; each rank samples from its own random stream, so the run goes on "
                         "with other samples than an uninterrupted one would (as valid, not the same numbers)")
            if self.info.is_main:
                truncate_metrics(self.cfg.out_dir, self.start, bool(self.state.get("pending_eval")),
                                 self.state.get("step_logged", True), interim=bool(self.state.get("interim_line")))
                truncate_metrics(self.cfg.out_dir, self.start, bool(self.state.get("pending_eval")), False,
                                 EVAL_SAMPLES)
        self.logger = MetricsLogger(self.cfg.out_dir, enabled=self.info.is_main, report_to=self.cfg.report_to,
                                    name=f"{self.name} {Path(self.cfg.out_dir).name}", config=self.config,
                                    resume_step=self.start if self.resuming else None,
                                    rewrite_step=bool(self.state.get("pending_eval") or self.state.get("interim_line")))
        self.bar = progress(self.max_steps, self.start, desc=f"{self.name} ({self.unit}s)",
                            enabled=self.info.is_main and self.cfg.progress)

    def steps(self, evaluate: Callable | None = None):
        """The step indices still to run (0-based); stops early when an eval asks to. ``evaluate``:
        the eval ``step_done`` is given, for what a resumed run must settle first (``_settle_resume``).

        While they run, SIGTERM and SIGINT are held: the step finishes, a complete checkpoint is
        written and ``Preempted`` is raised (a second signal exits at once)."""
        cfg = self.cfg
        if self.info.enabled and evaluate is not None and cfg.eval_every and (
                not cfg.save_every or cfg.eval_every % cfg.save_every):
            self.say(f"every eval step (eval_every={cfg.eval_every}) is also checkpointed, before its eval (across "
                     "ranks, an eval that fails could not save after it); off save_every such a checkpoint is kept "
                     "only until the next one and not counted in keep_checkpoints")
        self.held = hold_signals(self._on_signal)
        try:
            self._settle_resume(evaluate)
            for step in range(self.start, self.start if self.stopped_early else self.max_steps):
                yield step
                if self.stopped_early:
                    break
        finally:
            self.release()

    def _settle_resume(self, evaluate: Callable | None) -> None:
        """Before a resumed run's first step: the eval a failure interrupted runs again (and is
        checkpointed), and a run an eval stopped stays stopped only if the eval still says stop
        under the current config (a raised ``stop_at_accuracy``, none, a larger ``max_steps``)."""
        if not self.resuming:
            return
        if self.state.get("pending_eval") and evaluate is not None:  # see step_done
            self.stopped_early = any_rank(bool(self.evaluate(evaluate, self.done).get("stop")), self.info)
            if self.stopped_early and not self.state.get("step_logged", True):  # as an early stop's last step is
                self.log_window(self.done)
            self.save(self.done, {k: v for k, v in self.state.items() if k not in RUN_STATE}, into=self.resumed_from)
        elif self.stopped_early:
            self.stopped_early = any_rank(evaluate is not None and bool(evaluate().get("stop")), self.info)
            if not self.stopped_early:
                self.say("under this config the eval no longer stops the run: training on")

    def release(self) -> None:
        """Give SIGTERM and SIGINT back their previous handlers."""
        release_signals(self.held)
        self.held = {}

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:  # the second one: at once (a half-written checkpoint is never picked)
            kept = latest_checkpoint(self.cfg.out_dir)
            print(f"{self.name}: {name} again: exiting now; the last complete checkpoint is kept"
                  + (f": {kept}" if kept is not None else " (there is none yet)"), file=sys.stderr)
            os._exit(128 + signum)
        self.signal = signum
        if self.finishing:
            self.say(f"{name}: the {self.unit}s are done; writing the final model folder first ({name} again exits "
                     "at once)")
        else:
            self.say(f"{name}: finishing {self.unit} {self.done + 1}, then writing a checkpoint ({name} again exits at once)")

    def optimizer_step(self, loss: torch.Tensor, clip_apart: list | None = None) -> tuple[float, float]:
        """``loss``: this rank's share of the loss whose gradients were accumulated. Checks the
        summed loss, then all-reduces gradients, clips, checks the norm and steps. Returns
        (loss summed over ranks, gradient norm)."""
        trained, optimizer, scheduler = self.modules
        total = all_reduce_sum(loss.detach().double().reshape(1).clone(), self.info).item()
        check_finite(total, "loss", self.done + 1)
        self.lr = scheduler.get_last_lr()[0]  # the rate this step takes (the scheduler then moves on)
        grad_norm = optimizer_step(trained, optimizer, scheduler, self.cfg.max_grad_norm, self.info, self.done + 1,
                                   clip_apart, sharded=is_sharded(trained))
        self.optimizer_steps += 1
        return total, grad_norm

    def step_done(self, means: dict | None = None, shares: dict | None = None, evaluate: Callable | None = None,
                  state: dict | None = None) -> None:
        """End of one step: log (metrics reduced over ranks), evaluate, checkpoint on cadence.

        An eval step's training is never lost to a failing eval. In one process the failure saves
        the step. Across ranks the others would be waiting inside the eval's collectives, unable to
        save, so the step is saved before its eval and that checkpoint completed after it
        (``amend_checkpoint``); off the save cadence it is kept only until a later one."""
        cfg, done = self.cfg, self.done + 1
        self.done = done
        last = done == self.max_steps
        trained, optimizer, scheduler = self.modules
        self.metrics = reduce_metrics(means or {}, shares or {}, self.info)
        self.metrics.update(lr=self.lr if self.lr is not None else scheduler.get_last_lr()[0],
                            optimizer_steps=self.optimizer_steps)
        self.window.append(dict(self.metrics))
        self.bar.update(1)
        self.bar.set_postfix({k: f"{self.metrics[k]:.4f}" for k in self.show if k in self.metrics}, refresh=False)
        evaluated, written, logged = None, None, False
        on_cadence = bool(cfg.save_every and done % cfg.save_every == 0) or last
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
            logged = done % cfg.log_every == 0 or last  # the step's line before its eval's, on any number of ranks
            if logged:
                self.log_window(done)
            if self.info.enabled:
                written = self.save(done, state, pending_eval=True, step_logged=logged, transient=not on_cadence)
            try:
                evaluated = self.evaluate(evaluate, done)
            except BaseException:
                if not self.info.enabled:  # off the log cadence an interim line: a resumed run drops it (see below)
                    if not logged:
                        self.log_window(done, keep=True)
                    self.save(done, state, pending_eval=True, step_logged=logged, transient=not on_cadence)
                raise
        flags = torch.tensor([float(bool(evaluated and evaluated.get("stop"))), float(self.signal is not None)],
                             dtype=torch.float64)
        stop, preempted = (all_reduce_sum(flags, self.info) > 0).tolist()  # every rank stops together
        self.stopped_early = stop
        on_log = done % cfg.log_every == 0 or last or stop  # a run's last step is logged
        # a preempted step off the cadence is logged too, so that a run never resumed loses no step; its window
        # stays in the checkpoint and a resumed run drops that interim line, so its lines are the straight run's
        interim = preempted and not on_log and not logged
        if (on_log or preempted) and not logged:
            self.log_window(done, keep=interim)
        if written is not None or on_cadence or stop or preempted:
            path = self.save(done, state, into=written, interim=interim)
            if preempted and not (last or stop):
                self.close()
                signum = self.signal or signal.SIGTERM  # a rank that got none stops with the others
                raise Preempted(f"stopped by {signal.Signals(signum).name} after {self.unit} {done} of {self.max_steps}; "
                                f"checkpoint {path} is complete: rerun with train.resume=true to continue", signum)

    def log_window(self, done: int, keep: bool = False) -> None:
        """The line of step ``done``: the means of the steps since the last line (``window_means``).
        ``keep``: an interim line, the steps kept for the next one (a resumed run drops it)."""
        if self.window:
            self.logger.log(done, window_means(self.window))
        if not keep:
            self.window = []

    def save(self, done: int, state: dict | None, pending_eval: bool = False, step_logged: bool = True,
             transient: bool = False, into: Path | None = None, interim: bool = False) -> Path:
        """A complete checkpoint of step ``done``: the modules, and what the run's summary is made
        of (evals, the last metrics, an early stop, an eval still to run, whether the step's
        metrics are logged yet, and the steps since the last line: with ``interim`` its line is
        one a resumed run drops) so that a resumed run ends as this one would. ``into``: this step's
        checkpoint written before its eval, whose modules stand: only the RNG states and the run's
        summary are written again."""
        trained, optimizer, scheduler = self.modules
        extra = {"optimizer_steps": self.optimizer_steps, "metrics": plain_tree(self.metrics),
                 "kernels": kernel_choices() if self.device == "cpu" else None,
                 "evals": plain_tree(self.evals),
                 "stopped_early": self.stopped_early, "pending_eval": pending_eval, "step_logged": step_logged,
                 "log_window": [{k: v if math.isfinite(v) else repr(v) for k, v in m.items()} for m in self.window],
                 "interim_line": interim,
                 **self.keep, **(state or {})}
        if into is not None:
            path = amend_checkpoint(into, extra, self.info)
        else:
            path = save_checkpoint(self.cfg.out_dir, done, trained, optimizer, scheduler, self.config, extra=extra,
                                   keep=self.cfg.keep_checkpoints, info=self.info, sharded=self.sharded,
                                   transient=transient, kept=self.kept)
        barrier(self.info)
        return path

    def evaluate(self, evaluate: Callable, done: int) -> dict:
        evaluated = self.show_samples(evaluate(), done)
        self.evals.append({"step": done, **{k: v for k, v in evaluated.items() if k != "stop"}})
        self.logger.log(done, {k: v for k, v in self.evals[-1].items() if k != "step"}, prefix="eval")  # the line's own
        if self.info.is_main:  # tqdm.write prints even on a disabled bar
            self.bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in evaluated.items()
                                                        if isinstance(v, float)))
        return evaluated

    def show_samples(self, evaluated: dict, step: int) -> dict:
        """An eval's metrics without its ``samples`` (a few held-out answers), written a line each in
        eval_samples.jsonl with ``step``."""
        evaluated = dict(evaluated)
        shown = evaluated.pop("samples", None)
        if shown and self.info.is_main:
            with open(Path(self.cfg.out_dir) / EVAL_SAMPLES, "a") as f:
                f.writelines(json.dumps(plain_tree({"step": step, **row})) + "\n" for row in shown)
        return evaluated

    def start_eval(self, evaluated: dict) -> dict:
        """The start model's eval (GRPO's, PPO's, DPO's metrics "before"): its answers are written as
        step 0, once: a resumed run wrote them when it started."""
        return self.show_samples(evaluated, 0) if not self.resuming else {k: v for k, v in evaluated.items()
                                                                          if k != "samples"}

    def close(self) -> None:
        self.release()
        self._close_outputs()
        self._bars_back()

    def _close_outputs(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()

    def _bars_back(self) -> None:
        """transformers' progress bars as they were before the run (``train.progress=false`` turns them off)."""
        if getattr(self, "bars_were_on", False):
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()

    def finish(self, model, tokenizer, summary: dict, files: dict[str, str] | None = None) -> dict:
        """Save the trained model to ``<out>/model`` (with ``files``, name: text, as ``save_model``'s)
        and the summary to ``<out>/result.json`` (rank 0). SIGTERM and SIGINT are held meanwhile,
        as during the steps: the folder (seconds) is written first, and the run ends complete; a
        second signal exits at once, the last checkpoint kept (before, a signal here ended the
        process with no word and no plots, and only a resume completed the folder)."""
        self.finishing, self.held = True, hold_signals(self._on_signal)
        try:
            summary = self._finish(model, tokenizer, summary, files)
        finally:
            self.release()
            self._bars_back()
        if self.signal is not None:
            self.say(f"{signal.Signals(self.signal).name} was received: the final model folder "
                     f"{Path(self.cfg.out_dir) / 'model'} was written first, and the run is complete")
        return summary

    def _finish(self, model, tokenizer, summary: dict, files: dict[str, str] | None) -> dict:
        self._close_outputs()
        summary = {"steps": self.done, "steps_unit": self.unit, "optimizer_steps": self.optimizer_steps,
                   "evals": self.evals, **summary}
        out = Path(self.cfg.out_dir)
        try:
            final, legend = card_metrics(summary, self.metrics, self.evals, self.done, self.unit)
            self.save_model(model, tokenizer, out / "model", metrics=final, legend=legend, files=files,
                            what={"rm": "reward model", "prm": "process reward model"}.get(self.name, "model"))
            if self.info.is_main:
                write_config(out, self.config)
                (out / "result.json").write_text(json.dumps(plain_tree(summary), indent=1))  # NaN as null
        except Exception as e:  # a full disk, no permission: one line, and no half-written model left
            cause = write_failure(e, out)
            if self.info.is_main:
                shutil.rmtree(out / "model.tmp", ignore_errors=True)
            raise CheckpointError(f"cannot write the final model {out / 'model'}: {cause}; the partial "
                                  f"folder was removed, the last complete checkpoint {latest_checkpoint(out)} is "
                                  "kept: rerun with train.resume=true to write it") from None
        if self.info.is_main and self.cfg.plots:
            plot_runs([out], out / "plots")
        barrier(self.info)
        return summary


def card_metrics(summary: dict, last: dict, evals: list[dict], done: int, unit: str) -> tuple[dict, list[str]]:
    """The final model card's metrics and what each kind is: the summary (``result.json``), then the
    last step's own metrics (over its batch; not metrics.jsonl's last line, a mean over the steps
    since the one before) and the last eval's, each only where the summary does not already
    give the same name (or ``eval_`` name) the same value: a final eval's accuracy is the summary's."""
    final = plain_tree({k: v for k, v in summary.items() if k != "evals"})  # NaN as None: compared equal
    last = plain_tree(last)
    legend = ["without a prefix: the run's summary, as in `result.json`"]
    trained = {f"train/{k}": v for k, v in last.items()
               if k in ("loss", "reward_mean", "rm_score", "kl") and final.get(k) != v}
    if trained:
        legend.append(f"`train/`: the last {unit}'s own, over its batch ({unit} {done})")
    held = plain_tree(evals[-1] if evals else {})
    shown = {f"eval/{k}": v for k, v in held.items() if k != "step" and v not in (final.get(k), final.get(f"eval_{k}"))}
    if shown:
        legend.append(f"`eval/`: the last eval's ({unit} {held.get('step')})")
    return {**final, **trained, **shown}, legend


def hold_signals(handler) -> dict:
    """Route SIGTERM and SIGINT to ``handler``; returns the previous handlers (none off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def release_signals(held: dict) -> None:
    for signum, previous in held.items():
        signal.signal(signum, previous)


def write_config(out: Path, config: dict) -> None:
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def kernel_line(pinned: str = "") -> str:
    """Which kernel the fp32 linear products take in this process, and why (models/kernels.py);
    ``pinned``: how the choices were fixed instead of timed here (``Run.pin_kernels``)."""
    auto = os.environ.get("RLHFKIT_FAST_LINEAR", "auto") == "auto" and onednn_linear_available()  # pins apply

    def said(choice: tuple[str, float, float]) -> str:
        kernel, onednn_s, blas_s = choice
        timed = f" (timed here: oneDNN {onednn_s * 1e3:.2f} ms, BLAS {blas_s * 1e3:.2f} ms)" if onednn_s == onednn_s \
            else f" ({pinned})" if pinned and auto else ""
        return f"{'oneDNN' if kernel == 'onednn' else 'BLAS'}{timed}"

    line = f"fp32 linear products through {said(linear_kernel())}, the sampler's through {said(decode_kernel())}"
    if decode_kernel()[0] == "onednn":
        tokens = layout_min_new_tokens()
        line += (f" on weights laid out from {tokens} new tokens a call" if tokens < NEVER
                 else " on weights as they lie (a layout saved nothing here)")
    return line + "; RLHFKIT_FAST_LINEAR=1 or 0 forces oneDNN or BLAS"


def check_resumed_config(checkpoint: Path, now: dict, info: DistInfo, force: bool = False) -> None:
    """Refuse, before any model loads, a resumed run whose config changes what the checkpoint's
    steps were trained with (``config.resume_changes``; ``force``: say it instead); say what else
    it changes."""
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    allowed, refused = resume_changes(saved, now)
    if refused and not force:
        raise ConfigError(f"train.resume: {checkpoint} was trained with other settings ({'; '.join(refused)}); "
                          "a resumed run goes on with the checkpoint's optimizer, schedule and place in the data, "
                          "so give the values it had, start a new run in another train.out_dir, or, where the "
                          "change is harmless (the same data at another path), pass train.resume=force")
    said = allowed + refused
    if any(d.startswith("train.seed:") for d in refused):
        said.append("the new seed reorders the data from here (this epoch's rows may repeat or be missed), while "
                    "sampling and dropout go on from the checkpoint's random state")
    if said and info.is_main:
        stretched = any(d.startswith(LENGTH_KEYS) for d in said)
        print(f"resuming {checkpoint} with {'; '.join(said)}"
              + (" (the lr schedule runs to the new length from here)" if stretched else ""), file=sys.stderr)


def going_back(checkpoint: Path, unit: str, done: int, length: str) -> ConfigError:
    """The error of a resume whose length ends before its checkpoint's step."""
    return ConfigError(f"train.resume: {checkpoint} is at {unit} {done}, past {length}; a resumed run cannot go "
                       "back: raise train.max_steps (or train.epochs), or start a new run in another train.out_dir")


def start_run(cfg: TrainConfig, config, name: str, unit: str = "optimizer step",
              show: tuple[str, ...] = ("loss",)) -> Run:
    """Distributed set-up and the out-dir check, before any model loads; writes config.yaml."""
    info = init_distributed(cfg.device)
    forget_prepared()  # a model object may have been changed by the caller since a run in this process sampled it
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:  # transformers' loading and writing bars too (on again when the run ends)
        hf_logging.disable_progress_bar()
    if unit == "optimizer step":  # the offline methods split train.batch_size over ranks and micro-batches
        split_batch(cfg, info)
    resuming = prepare_out_dir(cfg, info)
    resolved = plain_dict(config)
    if resuming:
        checkpoint = latest_checkpoint(cfg.out_dir)
        done = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        if not cfg.epochs and done > cfg.max_steps:  # with epochs the length is known once the data is read
            raise going_back(checkpoint, unit, done, f"train.max_steps={cfg.max_steps}")
        check_resumed_config(checkpoint, resolved, info, force=cfg.resume == "force")  # says what changes
    if info.is_main:
        write_config(Path(cfg.out_dir), resolved)  # a config that cannot be written fails here, not at the end
    run = Run(cfg, resolved, info, name, unit, resuming, show, max_steps=cfg.max_steps)
    run.bars_were_on = bars
    if bars and not cfg.progress:  # a run that fails before its end: on again once it is let go
        weakref.finalize(run, hf_logging.enable_progress_bar)
    return run
