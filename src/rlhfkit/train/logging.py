"""Metrics to ``<out>/metrics.jsonl`` and to a tracker (``train.report_to``: TensorBoard when
installed, Weights & Biases, or none), a progress bar with ETA."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class MetricsLogger:
    """Append-only jsonl of metric dicts; rank 0 only (pass ``enabled=False`` elsewhere).
    ``resume_step``: the checkpoint's step a resumed run continues from; ``rewrite_step``: that
    step's lines were cut back (its eval runs again, or its train line was an interim one), so its
    TensorBoard events are written anew from what metrics.jsonl kept."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, report_to: str = "tensorboard",
                 name: str = "", config: dict | None = None, resume_step: int | None = None,
                 rewrite_step: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = self.wandb = None
        self.start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():  # time_s goes on from the resumed run's last line
            self.start -= max((r.get("time_s") or 0.0 for r in read_metrics(out_dir)), default=0.0)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                # resuming from step N: events a killed run wrote after N are dropped, as metrics.jsonl's are
                # (from N itself where N's eval runs again; N's kept lines are then written anew)
                purge = None if resume_step is None else resume_step + (0 if rewrite_step else 1)
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge)
                if rewrite_step and self.path.is_file():
                    for row in (r for r in read_metrics(out_dir) if r.get("step") == resume_step):
                        self._scalars(row)
            except ImportError:
                self.writer = None
        elif report_to == "wandb":  # WANDB_MODE=offline writes <out>/wandb/offline-run-* for `wandb sync`
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhfkit"), name=name or None,
                                    dir=str(Path(out_dir)), config=config or {}, reinit="finish_previous")

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time_s": round(time.time() - self.start, 3)}
        record.update({f"{prefix}/{k}": plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self._scalars(record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def _scalars(self, record: dict) -> None:
        for k, v in record.items():
            if k not in ("step", "time_s") and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def plain(value):
    """A metric as JSON holds it: a number (a tensor's item), NaN and infinities as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is not JSON: written as null
    return value


def plain_tree(value):
    """``plain`` at every depth of dicts and lists (a summary, a list of evals)."""
    if isinstance(value, dict):
        return {k: plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_tree(v) for v in value]
    return plain(value)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


EVAL_SAMPLES = "eval_samples.jsonl"  # a few held-out prompts and answers at each eval (train/run.py)


def truncate_metrics(out_dir: str | Path, step: int, pending_eval: bool = False, step_logged: bool = True,
                     name: str = "metrics.jsonl", interim: bool = False) -> None:
    """Drop the metrics a killed run logged after the checkpoint it resumes from (and a line cut
    short). ``pending_eval``: that checkpoint's step has its eval run again on resume, so an eval
    line already logged at it goes too, and its train line unless the checkpoint had it logged.
    ``interim``: its train line at ``step`` was an interim one (a preempted step off the log
    cadence), whose steps the resumed run's next line covers: it goes too.
    ``name``: another jsonl of step-stamped lines (``EVAL_SAMPLES``, every line an eval's: pass
    ``step_logged=False``)."""
    path = Path(out_dir) / name
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            evaluated = any(k.startswith("eval/") for k in row)
            again = row["step"] == step and ((pending_eval and (not step_logged or evaluated))
                                             or (interim and not evaluated))
            if row["step"] <= step and not again:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar (steps, rate, ETA, latest loss via ``set_postfix``); a no-op when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 5.0)
