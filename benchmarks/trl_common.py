"""What the TRL side-by-side scripts share: the flags and assets of run.py, a step timer, the JSON line.

Each `trl_METHOD.py` does the work `run.py METHOD` does (../shared/docs/BENCHMARK.md) with TRL's
own trainer, in TRL's own environment (torch==2.13.0 installed first so that pip keeps the CPU
build; `make trl-env` makes it):

    python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0
    .venv-trl/bin/pip install trl==1.16.0 torch==2.13.0 && .venv-trl/bin/pip install --no-deps -e .

A step's time is the interval between consecutive ``on_step_end`` callbacks: everything TRL does
for one optimizer step (fetching and collating the batch, generation for GRPO, forward, backward,
clipping, the optimizer step, its own bookkeeping); logging is off. The first ``--warmup``
intervals are dropped. `compare.py` runs these beside `run.py` and prints the ratios.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RLHFKIT_FAST_LINEAR"] = "0"  # TRL's models stay plain transformers models

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402  (sets the thread count as run.py does)


class StepTimer(TrainerCallback):
    """Times every step; with ``profile`` > 0 the last ``profile`` steps run under torch.profiler."""

    def __init__(self, timed: int, profile: int = 0):
        self.times, self.last, self.timed, self.profile = [], None, timed, profile
        self.profiler, self.profile_start, self.profile_result = None, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if self.profile and len(self.times) == self.timed:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
            self.profile_start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            wall = time.perf_counter() - self.profile_start
            self.profiler.__exit__(None, None, None)
            self.profile_result = run.by_kind(self.profiler, self.profile, wall)


def setup(description: str):
    """(args, asset paths, tokenizer, StepTimer, the TrainingArguments every method shares)."""
    from transformers import PreTrainedTokenizerFast

    args = run.parser().parse_args()
    torch.manual_seed(0)
    paths = run.assets(args)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"])
    common = dict(output_dir=str(Path(paths["model"]).parent / "trl_out"), learning_rate=1e-5,
                  lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, seed=0,
                  max_steps=args.warmup + args.steps + args.profile, logging_steps=10**6, report_to="none", use_cpu=True,
                  save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                  # TRL defaults both to True (bf16 autocast, activation checkpointing); BENCHMARK.md: fp32, none
                  bf16=False, gradient_checkpointing=False)
    run.log(f"trl {description}: {paths['model']}")
    return args, paths, tokenizer, StepTimer(args.warmup + args.steps, args.profile), common


def rows(paths, name: str, n: int) -> list[dict]:
    return [r.data for r in run.read_rows(paths["data"] / name)][:n]


def report(method: str, args, timer: StepTimer, extra: dict | None = None) -> None:
    import trl

    timed = timer.times[args.warmup: args.warmup + args.steps]
    print(json.dumps({"method": method, "library": f"trl-{trl.__version__}",
                      "sec_per_step": round(statistics.median(timed), 5), "sec_per_step_min": round(min(timed), 5),
                      "sec_per_step_max": round(max(timed), 5), "steps": len(timed),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "threads": torch.get_num_threads(), **(extra or {}),
                      **({"profile_ms_per_step": timer.profile_result} if timer.profile_result else {})}), flush=True)
