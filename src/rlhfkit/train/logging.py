"""Metrics to ``<out>/metrics.jsonl`` (and TensorBoard when installed), a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLogger:
    """Append-only jsonl of metric dicts; rank 0 only (pass ``enabled=False`` elsewhere)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        self.start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time_s": round(time.time() - self.start, 3)}
        record.update({f"{prefix}/{k}": _plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "time_s") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is not JSON: written as null
    return value


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar (steps, rate, ETA, latest loss via ``set_postfix``); a no-op when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 5.0)
