"""benchmarks/run.py --split: time inside oneDNN products and optimizer steps is told apart from the rest."""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_split_attributes_time_to_products_optimizer_and_rest(monkeypatch):
    import run as bench

    import rlhfkit.train.run as train_run
    from rlhfkit.models import kernels

    def product(x, w, b):
        time.sleep(0.03)

    def optimizer_step(*a, **k):
        time.sleep(0.02)

    monkeypatch.setenv("RLHFKIT_SCRIPTED_LAYERS", "1")
    monkeypatch.setattr(kernels, "_onednn", product)
    monkeypatch.setattr(train_run, "optimizer_step", optimizer_step)

    seen = []

    def step(i):
        seen.append(os.environ.get("RLHFKIT_SCRIPTED_LAYERS"))  # the node's forward in Python: its products timed
        kernels._onednn(None, None, None)  # looked up at call time, as kernels.py does
        train_run.optimizer_step()
        time.sleep(0.01)

    split = bench.split_steps(step, 0, 3)
    assert split["matmul"] == pytest.approx(30, abs=8) and split["optimizer"] == pytest.approx(20, abs=8)
    assert split["rest"] == pytest.approx(10, abs=8)
    assert split["wall"] == pytest.approx(split["matmul"] + split["optimizer"] + split["rest"], abs=0.05)
    assert kernels._onednn is product and train_run.optimizer_step is optimizer_step  # put back
    assert seen == ["0"] * 3 and os.environ["RLHFKIT_SCRIPTED_LAYERS"] == "1"
