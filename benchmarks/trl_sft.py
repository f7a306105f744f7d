"""Side-by-side reference: TRL's SFTTrainer on the same assets and settings as `run.py sft`.

Not part of the test suite and not installed by the Makefile: it needs TRL in its own
environment (with torch==2.13.0 installed first so that pip keeps the CPU build), e.g.

    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 && /tmp/trl/bin/pip install trl -e .
    /tmp/trl/bin/python benchmarks/trl_sft.py

Run it right after `python benchmarks/run.py sft` in the same sitting and compare the medians.
"""

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def main(steps: int = 20, warmup: int = 2) -> None:
    class Args:
        model = data = tokenizer = rm = None

    paths = run.assets(Args)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    rows = [r.data for r in run.read_rows(paths["data"] / "sft.jsonl")][: 16 * (steps + warmup)]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    timer = StepTimer()
    config = SFTConfig(output_dir=str(Path(paths["model"]).parent / "trl_out"), per_device_train_batch_size=16,
                       learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, max_length=128,
                       packing=False, max_steps=steps + warmup, logging_steps=1, report_to="none", use_cpu=True,
                       save_strategy="no", weight_decay=0.0, seed=0, dataloader_num_workers=0)
    SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
               callbacks=[timer]).train()
    timed = timer.times[warmup:]
    print(json.dumps({"method": "sft", "library": "trl", "sec_per_step": round(statistics.median(timed), 5),
                      "sec_per_step_min": round(min(timed), 5), "sec_per_step_max": round(max(timed), 5),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
