"""``rlhfkit demo``: the pipeline on the embedded tiny default, on a laptop CPU, in minutes.

Each stage is a small function returning its held-out metrics; the demo times it, prints a
table and writes ``<out>/summary.json`` (one object per stage, keyed by stage name).

Stages whose inputs are ready run side by side in ``jobs`` worker processes, each with
``cpus / jobs`` threads. The tiny model's ops are small: a second thread speeds a step up by
far less than 2x, and when another process holds a core, two OpenMP threads wait on each other
at every op (an SFT step measured 5-8x slower with 2 threads than with 1 on a busy 2-core
machine). Two one-thread processes keep both cores busy either way.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from ..data.rows import read_rows
from ..methods.common import load_policy
from ..methods.cpo import CPOConfig
from ..methods.distill import DistillConfig, run_distill
from ..methods.dpo import DPOConfig, run_dpo
from ..methods.grpo import GRPOConfig, run_grpo
from ..methods.kto import KTOConfig, run_kto
from ..methods.online_dpo import OnlineDPOConfig, run_online_dpo
from ..methods.orpo import ORPOConfig
from ..methods.ppo import PPOConfig, run_ppo
from ..methods.prm import PRMConfig, run_prm
from ..methods.rloo import RLOOConfig, run_rloo
from ..methods.rm import RMConfig, run_rm
from ..methods.sft import SFTConfig, run_sft
from ..models.tiny import write_tiny_default
from ..rollout.evaluate import exact_match
from ..tasks.arithmetic import STEP_SEPARATOR
from ..train.config import ConfigError, TrainConfig


def _train(ctx: dict, name: str, **fields) -> TrainConfig:
    """A stage's TrainConfig: its own folder under the demo's, the demo's seed, no tracker; no
    progress bar when stages run side by side (their bars would overwrite each other)."""
    return TrainConfig(out_dir=str(ctx["out"] / name), seed=ctx["seed"], report_to="none", log_every=10,
                       progress=ctx.get("progress", True), **fields)


def _stage_base(ctx: dict) -> dict:
    model, tokenizer = load_policy(str(ctx["assets"]["base"]), None)
    return exact_match(model, tokenizer, ctx["eval_rows"], max_new_tokens=8)


def _stage_sft(ctx: dict) -> dict:
    data = ctx["assets"]["data"]
    cfg = SFTConfig(
        model=str(ctx["assets"]["base"]), train_data=str(data / "sft_train.jsonl"),
        eval_data=str(data / "sft_eval.jsonl"), max_length=64, eval_limit=len(ctx["eval_rows"]),
        eval_max_new_tokens=8, stop_at_accuracy=0.97, snapshot_at_accuracy=0.5,
        train=_train(ctx, "sft", max_steps=400 if ctx["quick"] else 2000, batch_size=128, lr=5e-3, warmup_steps=50,
                     eval_every=100))
    result = run_sft(cfg)
    ctx["sft_model"] = str(ctx["out"] / "sft" / "model")
    # Later stages start from the demonstration-budget snapshot when there is one (as InstructGPT
    # did, they need error left to remove), else from the final SFT model.
    snapshot = result.get("snapshot")
    ctx["start_model"] = snapshot["path"] if snapshot else ctx["sft_model"]
    ctx["start_note"] = (f"the first SFT snapshot with held-out accuracy >= 0.5 ({snapshot['accuracy']:.2f})"
                         if snapshot else "the final SFT model")
    return {"accuracy": result["accuracy"], "steps": result["steps"],
            "snapshot_accuracy": snapshot["accuracy"] if snapshot else None}


def _stage_rm(ctx: dict) -> dict:
    data = ctx["assets"]["data"]
    cfg = RMConfig(model=ctx["sft_model"], train_data=str(data / "rankings_train.jsonl"),
                   eval_data=str(data / "rankings_eval.jsonl"), max_length=64, eval_limit=500,
                   center_coef=0.0025,  # scores comparable across prompts, for the PPO stage
                   train=_train(ctx, "rm", max_steps=500 if ctx["quick"] else 1500, batch_size=32, lr=2e-3,
                                warmup_steps=20, eval_every=250))
    result = run_rm(cfg)
    ctx["rm_model"] = str(ctx["out"] / "rm" / "model")
    return {"pairwise_accuracy": result["pairwise_accuracy"], "kendall_tau": result["kendall_tau"],
            "top1_accuracy": result["top1_accuracy"], "steps": result["steps"]}


def _stage_dpo(ctx: dict) -> dict:
    data = ctx["assets"]["data"]
    cfg = DPOConfig(model=ctx["start_model"], train_data=str(data / "prefs_train.jsonl"),
                    eval_data=str(data / "prefs_eval.jsonl"), eval_prompts=str(data / "sft_eval.jsonl"),
                    max_length=64, eval_limit=500, beta=0.5,
                    rpo_alpha=1.0,  # RPO's NLL on the chosen answers: without it exact match fell (0.532 -> 0.462)
                    train=_train(ctx, "dpo", max_steps=100 if ctx["quick"] else 200, batch_size=32, lr=3e-4,
                                 warmup_steps=10, eval_every=50))
    result = run_dpo(cfg)
    return {k: result[k] for k in ("preference_accuracy", "preference_accuracy_before", "accuracy",
                                   "accuracy_before", "reference", "steps")}


def _reference_free(ctx: dict, name: str, config, lr: float, **fields) -> dict:
    """DPO's pairs with no reference model (``rlhfkit orpo``, ``rlhfkit cpo``), as the shipped configs set them."""
    data = ctx["assets"]["data"]
    cfg = config(model=ctx["start_model"], train_data=str(data / "prefs_train.jsonl"),
                 eval_data=str(data / "prefs_eval.jsonl"), eval_prompts=str(data / "sft_eval.jsonl"),
                 max_length=64, eval_limit=ctx.get("eval_limit", 500), **fields,
                 train=_train(ctx, name, max_steps=75 if ctx["quick"] else 150, batch_size=32,
                              lr=lr, warmup_steps=10, eval_every=50))
    result = run_dpo(cfg)
    return {k: result[k] for k in ("preference_accuracy", "preference_accuracy_before", "accuracy",
                                   "accuracy_before", "steps")}


def _stage_orpo(ctx: dict) -> dict:
    """ORPO (orpo_tiny's settings): the odds-ratio term and the chosen answers' NLL, no reference."""
    return _reference_free(ctx, "orpo", ORPOConfig, lr=3e-4)


def _stage_simpo(ctx: dict) -> dict:
    """SimPO (cpo_tiny's settings: beta 2, gamma 0.5, no NLL, lr 3e-5)."""
    return _reference_free(ctx, "simpo", CPOConfig, lr=3e-5, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                           rpo_alpha=0.0)


def _stage_online_dpo(ctx: dict) -> dict:
    """Online DPO (online_dpo_tiny's settings): two sampled answers a prompt, judged by exact_answer."""
    data = ctx["assets"]["data"]
    cfg = OnlineDPOConfig(model=ctx["start_model"], train_data=str(data / "prompts_train.jsonl"),
                          eval_data=str(data / "prompts_eval.jsonl"), eval_limit=ctx.get("eval_limit", 500),
                          rewards="exact_answer",
                          max_new_tokens=8, eval_max_new_tokens=8, prompts_per_step=64, beta=0.1,
                          train=_train(ctx, "online_dpo", max_steps=50 if ctx["quick"] else 100, lr=5e-5,
                                       eval_every=25))
    result = run_online_dpo(cfg)
    return {k: result[k] for k in ("accuracy", "accuracy_before", "steps")}


def _stage_kto(ctx: dict) -> dict:
    """KTO on DPO's pairs read as unpaired answers (chosen desirable, rejected not), from the SFT snapshot."""
    data = ctx["assets"]["data"]
    cfg = KTOConfig(model=ctx["start_model"], train_data=str(data / "prefs_train.jsonl"),
                    eval_data=str(data / "prefs_eval.jsonl"), eval_prompts=str(data / "sft_eval.jsonl"),
                    max_length=64, eval_limit=500, beta=0.5,
                    train=_train(ctx, "kto", max_steps=100 if ctx["quick"] else 200, batch_size=32, lr=3e-4,
                                 warmup_steps=10, eval_every=50))
    result = run_kto(cfg)
    return {k: result[k] for k in ("preference_accuracy", "accuracy", "accuracy_before", "margin", "steps")}


def _stage_rloo(ctx: dict) -> dict:
    """RLOO with TRL's defaults (the KL in the reward, beta 0.05) on GRPO's task and start."""
    data = ctx["assets"]["data"]
    cfg = RLOOConfig(model=ctx["start_model"], train_data=str(data / "prompts_train.jsonl"),
                     eval_data=str(data / "prompts_eval.jsonl"), eval_limit=500, group_size=8, prompts_per_step=16,
                     max_new_tokens=16, eval_max_new_tokens=16,
                     train=_train(ctx, "rloo", max_steps=200 // 3 if ctx["quick"] else 200, lr=1e-4,
                                  schedule="constant", eval_every=50))
    result = run_rloo(cfg)
    return {"accuracy": result["accuracy"], "accuracy_before": result["accuracy_before"], "steps": result["steps"]}


def _stage_distill(ctx: dict) -> dict:
    """On-policy distillation: the demonstration-budget snapshot learns the final SFT model's
    distributions on its own answers (beta 0.5: the generalized JSD)."""
    data = ctx["assets"]["data"]
    cfg = DistillConfig(model=ctx["start_model"], teacher=ctx["sft_model"], train_data=str(data / "prompts_train.jsonl"),
                        eval_data=str(data / "prompts_eval.jsonl"), eval_limit=500, prompts_per_step=16,
                        max_new_tokens=16, eval_max_new_tokens=16, beta=0.5,
                        train=_train(ctx, "distill", max_steps=200 // 3 if ctx["quick"] else 200, lr=1e-4,
                                     schedule="constant", eval_every=50))
    result = run_distill(cfg)
    return {k: result[k] for k in ("accuracy", "accuracy_before", "teacher_accuracy", "steps")}


def _grpo(ctx: dict, name: str, model: str, prefix: str, steps: int, **options) -> dict:
    data = ctx["assets"]["data"]
    cfg = GRPOConfig(model=model, train_data=str(data / f"{prefix}prompts_train.jsonl"),
                     eval_data=str(data / f"{prefix}prompts_eval.jsonl"), eval_limit=500, group_size=8,
                     prompts_per_step=16, beta=0.04,
                     train=_train(ctx, name, max_steps=steps // 3 if ctx["quick"] else steps, lr=1e-4,
                                  schedule="constant", eval_every=50), **options)
    result = run_grpo(cfg)
    return {"accuracy": result["accuracy"], "accuracy_before": result["accuracy_before"], "steps": result["steps"]}


def _stage_grpo(ctx: dict) -> dict:
    """ORM on the two-digit task, from the demonstration-budget SFT model."""
    return _grpo(ctx, "grpo", ctx["start_model"], "", 200, max_new_tokens=16, eval_max_new_tokens=16)


def _stage_sft_multistep(ctx: dict) -> dict:
    """SFT on the multi-step task, stopped at a demonstration budget for the PRM stage."""
    data = ctx["assets"]["data"]
    cfg = SFTConfig(
        model=str(ctx["assets"]["base"]), train_data=str(data / "multistep_sft_train.jsonl"),
        eval_data=str(data / "multistep_sft_eval.jsonl"), max_length=64, eval_limit=300, eval_max_new_tokens=40,
        stop_at_accuracy=0.5,
        train=_train(ctx, "sft_multistep", max_steps=3000, batch_size=64, lr=5e-3, warmup_steps=50, eval_every=100))
    result = run_sft(cfg)
    ctx["multistep_model"] = str(ctx["out"] / "sft_multistep" / "model")
    return {"accuracy": result["accuracy"], "steps": result["steps"]}


def _stage_grpo_prm(ctx: dict) -> dict:
    """PRM (per-step correctness by the task's rule) on the multi-step task."""
    return _grpo(ctx, "grpo_prm", ctx["multistep_model"], "multistep_", 200, process_reward="arithmetic_steps",
                 max_new_tokens=40, eval_max_new_tokens=40)


def _stage_prm(ctx: dict) -> dict:
    """A learned process reward model on step-labelled multi-step solutions, from the multi-step SFT model.

    Read from the model's own next-token likelihoods (``readout="likelihood"``): a head read at the
    separator stayed at what the step's position alone gives (0.700 vs 0.673, issue #14), while
    the SFT model already expects the right token one position before a wrong one."""
    data = ctx["assets"]["data"]
    cfg = PRMConfig(model=ctx["multistep_model"], train_data=str(data / "prm_train.jsonl"),
                    eval_data=str(data / "prm_eval.jsonl"), max_length=64, eval_limit=300, readout="likelihood",
                    step_separator=STEP_SEPARATOR,
                    train=TrainConfig(out_dir=str(ctx["out"] / "prm"), max_steps=100 if ctx["quick"] else 500,
                                      batch_size=32, lr=3e-4, warmup_steps=20, eval_every=100, log_every=10,
                                      seed=ctx["seed"], report_to="none", progress=ctx.get("progress", True)))
    result = run_prm(cfg)
    ctx["prm_model"] = str(ctx["out"] / "prm" / "model")
    return {k: result[k] for k in ("step_accuracy", "position_only_accuracy", "wrong_step_f1", "first_error_accuracy",
                                   "steps")}


def _stage_grpo_prm_learned(ctx: dict) -> dict:
    """PRM advantages from the learned process reward model's step scores, from the same SFT model as grpo_prm."""
    return _grpo(ctx, "grpo_prm_learned", ctx["multistep_model"], "multistep_", 200,
                 process_reward=f"prm:{ctx['prm_model']}", max_new_tokens=40, eval_max_new_tokens=40)


def _stage_ppo(ctx: dict) -> dict:
    """PPO against the stage-2 reward model, from the demonstration-budget SFT model."""
    data = ctx["assets"]["data"]
    cfg = PPOConfig(model=ctx["start_model"], reward_model=ctx["rm_model"], critic=ctx["start_model"],
                    train_data=str(data / "prompts_train.jsonl"), eval_data=str(data / "prompts_eval.jsonl"),
                    eval_limit=500, prompts_per_step=32, minibatch_size=16, ppo_epochs=2, kl_coef=0.05, lam=1.0,
                    critic_lr=1e-3,
                    train=_train(ctx, "ppo", max_steps=100 if ctx["quick"] else 200, lr=1e-5, schedule="constant",
                                 eval_every=50))
    result = run_ppo(cfg)
    return {k: result[k] for k in ("rm_score", "rm_score_before", "accuracy", "accuracy_before", "kl", "steps")}


STAGES = {"base": _stage_base, "sft": _stage_sft, "rm": _stage_rm, "dpo": _stage_dpo, "orpo": _stage_orpo,
          "simpo": _stage_simpo, "online_dpo": _stage_online_dpo, "kto": _stage_kto,
          "grpo": _stage_grpo, "rloo": _stage_rloo, "distill": _stage_distill, "ppo": _stage_ppo, "sft_multistep": _stage_sft_multistep,
          "grpo_prm": _stage_grpo_prm, "prm": _stage_prm, "grpo_prm_learned": _stage_grpo_prm_learned}
# Run only when named (--stages): DPO's relatives, kept out of the default run's time (about 280 s of 300)
OPTIONAL: tuple[str, ...] = ("orpo", "simpo", "online_dpo")
# The stages whose outputs (the ctx keys they set) each stage reads.
NEEDS = {"rm": ("sft",), "dpo": ("sft",), "orpo": ("sft",), "simpo": ("sft",), "online_dpo": ("sft",), "kto": ("sft",), "grpo": ("sft",), "rloo": ("sft",), "distill": ("sft",),
         "ppo": ("sft", "rm"),
         "grpo_prm": ("sft_multistep",),
         "prm": ("sft_multistep",), "grpo_prm_learned": ("sft_multistep", "prm")}


def _run_stage(name: str, ctx: dict, threads: int) -> tuple[dict, dict]:
    """One stage: (its metrics with ``seconds`` and ``cpu_seconds``, the ctx keys it set for later stages)."""
    torch.set_num_threads(threads)
    before = dict(ctx)
    start, cpu = time.time(), time.process_time()
    print(f"== demo stage: {name}", flush=True)
    metrics = STAGES[name](ctx)
    # cpu_seconds: this process's CPU time, what the stage takes on a core of its own (wall
    # seconds grow with whatever else runs on the machine).
    metrics.update(seconds=round(time.time() - start, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    print(f"== demo stage: {name} done in {metrics['seconds']} s", flush=True)
    return metrics, {k: v for k, v in ctx.items() if k not in before or before[k] is not v}


def _schedule(names: list[str], ctx: dict, jobs: int, threads: int, on_done) -> None:
    """Run ``names`` as their inputs become ready, at most ``jobs`` at a time in worker processes,
    the earliest listed first; ``on_done(name, metrics)`` as each ends. ``jobs=1``: in order, here."""
    if jobs == 1:
        for name in names:
            metrics, updates = _run_stage(name, ctx, threads)
            ctx.update(updates)
            on_done(name, metrics)
        return
    pending, done, running = list(names), set(), {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for name in [n for n in pending if all(d in done or d not in names for d in NEEDS.get(n, ()))]:
                if len(running) < jobs:
                    pending.remove(name)
                    running[pool.submit(_run_stage, name, dict(ctx), threads)] = name
            if not running:
                raise RuntimeError(f"demo stages {pending} wait on stages that never run")
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                name = running.pop(future)
                metrics, updates = future.result()
                ctx.update(updates)
                done.add(name)
                on_done(name, metrics)


def run_demo(out_dir: str | Path = "demo_out", quick: bool = False, seed: int = 0,
             stages: list[str] | None = None, jobs: int = 2) -> dict:
    """Run ``stages`` (default: all but OPTIONAL) on the tiny default into ``out_dir``, ``jobs`` at a
    time (each with cpus / jobs threads, at most 4); ``jobs=1`` runs them in order in this process."""
    unknown = [name for name in stages or [] if name not in STAGES]
    if unknown:
        raise ConfigError(f"unknown demo stage(s) {', '.join(unknown)}; the stages: {', '.join(STAGES)}")
    for name in stages or []:  # each stage starts from others' outputs: they run too, and first
        lacking = [d for d in NEEDS.get(name, ()) if d not in stages]
        if lacking:
            raise ConfigError(f"demo stage {name} starts from {', '.join(lacking)}: list it too "
                             f"(--stages {','.join(sorted({*stages, *lacking}, key=list(STAGES).index))})")
    jobs = max(1, jobs)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(cpus // jobs, 4))
    out = Path(out_dir)
    if (out / "summary.json").exists():
        raise ConfigError(f"{out} already holds a demo run; remove it or pass --out elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    assets = write_tiny_default(out / "assets", seed=seed, overwrite=True)  # a stopped demo's: written alike again
    names = sorted(stages, key=list(STAGES).index) if stages else [s for s in STAGES if s not in OPTIONAL]
    ctx = {"out": out, "assets": assets, "quick": quick, "seed": seed, "progress": jobs == 1,
           "eval_rows": read_rows(assets["data"] / "sft_eval.jsonl")}
    results: dict = {}
    start = time.time()

    def on_done(name: str, metrics: dict) -> None:
        results[name] = metrics
        (out / "summary.json").write_text(json.dumps({n: results[n] for n in names if n in results}, indent=1))

    _schedule(names, ctx, jobs, threads, on_done)
    summary: dict = {n: results[n] for n in names}
    summary["_notes"] = {"later_stages_start_from": ctx.get("start_note"), "jobs": jobs, "threads_per_job": threads,
                         "wall_seconds": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    write_report(out, summary)
    return summary


def write_report(out: Path, summary: dict) -> Path:
    """``out/report.md``: the stage table and, per stage, the figures its run wrote in plots/."""
    lines = ["# rlhfkit demo", "", "```", format_table(summary), "```", ""]
    for stage in summary:
        plots = sorted((out / stage / "plots").glob("*.png")) if not stage.startswith("_") else []
        if plots:
            lines += [f"## {stage}", ""] + [f"![{stage} {p.stem}]({p.relative_to(out)})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def format_table(summary: dict) -> str:
    keys = ["accuracy", "accuracy_before", "teacher_accuracy", "pairwise_accuracy", "preference_accuracy", "step_accuracy",
            "rm_score", "rm_score_before", "kl", "seconds", "cpu_seconds"]
    shown = [k for k in keys if any(k in v for s, v in summary.items() if not s.startswith("_"))]
    lines = ["stage          " + "".join(f"{k:>20s}" for k in shown)]
    for stage, values in summary.items():
        if stage.startswith("_"):
            continue
        cells = "".join(f"{_fmt(values.get(k)):>20s}" for k in shown)
        lines.append(f"{stage:14s} {cells}")
    notes = summary.get("_notes", {})
    if notes.get("later_stages_start_from"):
        lines.append(f"(stages after sft start from: {notes['later_stages_start_from']})")
    if notes.get("wall_seconds") is not None:
        lines.append(f"(wall time {notes['wall_seconds']} s: {notes['jobs']} stages at a time, "
                     f"{notes['threads_per_job']} thread(s) each)")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
