"""LoRA with FSDP2 on 2 spawned gloo ranks: SFT, RM and KTO (its reference the adapters-off base)
give the one-process LoRA run's losses, DPO in bf16 too (to bf16's precision), GRPO, RLOO, PPO and distillation (whose ranks sample
differently) the 2-rank replicated LoRA run's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from methods_setup import RUNS, method_config

from rlhfkit.train.config import LoraConfig, replace
from rlhfkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("lora_fsdp_worker.py")
METHODS = ("sft", "rm", "kto", "grpo", "rloo", "ppo", "distill")


def _losses(out: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]


def test_lora_under_fsdp_on_two_ranks_matches_one_process(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "two"
    for attempt in range(2):  # gloo can abort at exit; the results are written before teardown
        out.mkdir(exist_ok=True)
        try:
            subprocess.run([sys.executable, str(WORKER), str(out), str(tiny["base"].parent)], env=env,
                           capture_output=True, text=True, timeout=400)
        except subprocess.TimeoutExpired:
            pass
        if (out / "rank0.json").is_file() and (out / "rank1.json").is_file():
            break
        out = tmp_path / f"two-retry{attempt}"
    else:
        pytest.fail("the 2-rank LoRA/FSDP job did not finish")
    for method in METHODS:
        if method in ("grpo", "rloo", "ppo", "distill"):
            expected = out / f"{method}-replicate"
        else:
            expected = tmp_path / "one" / method
            RUNS[method](replace(method_config(method, tiny, expected, 3, log_every=1, strategy="fsdp"),
                                 lora=LoraConfig(r=4, alpha=8)))
        a, b = _losses(expected), _losses(out / f"{method}-fsdp")
        assert len(a) == len(b) == 3 and a[0] != a[2], (method, a, b)
        for x, y in zip(a, b):
            assert abs(x - y) < 1e-5, (method, a, b)
        assert (out / f"{method}-fsdp" / "model" / "adapter_config.json").is_file()
    # DPO + LoRA + bf16: its precomputed reference (adapters off, peft freezing them) was the first forward FSDP2
    # saw, which then took no gradient dtype for the adapters' groups: the first backward failed
    one = tmp_path / "one" / "dpo-bf16"
    RUNS["dpo"](replace(method_config("dpo", tiny, one, 3, log_every=1, strategy="fsdp", dtype="bf16"),
                        lora=LoraConfig(r=4, alpha=8)))
    a, b = _losses(one), _losses(out / "dpo-bf16-fsdp")
    assert len(a) == len(b) == 3 and a[0] != a[2], (a, b)
    for x, y in zip(a, b):  # bf16 products: FSDP2 casts the weights, one process the products' inputs
        assert abs(x - y) < 2e-3, (a, b)
