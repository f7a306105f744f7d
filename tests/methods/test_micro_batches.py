"""train.micro_batch_size in GRPO and PPO: the update forward split in micro-batches gives the
whole-batch update (global counts in every reduction)."""

import pytest
import torch
from methods_setup import RUNS, method_config

from rlhfkit.methods.common import load_policy
from rlhfkit.train.logging import read_metrics


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_micro_batches_give_the_whole_batch_update(method, tiny, tmp_path):
    results = {}
    for micro in (0, 1, 2):  # PPO: 2 rows per minibatch; GRPO: 16 rows, micro-batches of 1 and 2
        out = tmp_path / f"m{micro}"
        RUNS[method](method_config(method, tiny, out, 2, micro_batch_size=micro, log_every=1))
        model, _ = load_policy(str(out / "model"), None)
        results[micro] = ([m["train/loss"] for m in read_metrics(out)], [p.detach() for p in model.parameters()])
    whole_losses, whole_weights = results[0]
    base, _ = load_policy(str(tiny["base"]), None)
    assert any(not torch.equal(p, q) for p, q in zip(whole_weights, base.parameters()))
    for micro in (1, 2):
        losses, weights = results[micro]
        assert losses == pytest.approx(whole_losses, abs=1e-6)
        for p, q in zip(weights, whole_weights):  # Adam moves each weight by ~lr = 1e-4 a step; summation
            torch.testing.assert_close(p, q, atol=1e-5, rtol=0)  # order alone flips a rare near-eps element
