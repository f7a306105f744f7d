import pytest

from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.rollout.evaluate import exact_match
from rlhfkit.train.logging import read_metrics


@pytest.mark.slow
def test_sft_learns_the_task(tiny, sft_run):
    base, tok = load_policy(str(tiny["base"]), None)
    rows = read_rows(tiny["data"] / "sft_eval.jsonl")[:300]
    before = exact_match(base, tok, rows, 8)["accuracy"]
    assert before < 0.05  # a random model answers almost nothing right
    # Stated bar for the suite: >= 0.85 held-out exact match within 2000 steps of batch 128
    # (~60-80 s on 2 cores). The demo trains longer and shows >= 0.9.
    model, _ = load_policy(str(sft_run["out"] / "model"), None)
    after = exact_match(model, tok, rows, 8)["accuracy"]
    assert after >= 0.85, sft_run["evals"]
    assert abs(after - sft_run["accuracy"]) < 1e-9  # the saved model is the one evaluated
    losses = [m["train/loss"] for m in read_metrics(sft_run["out"]) if "train/loss" in m]
    assert losses[-1] < 0.2 * losses[0]
    assert sft_run["snapshot"] is not None and 0.5 <= sft_run["snapshot"]["accuracy"] < after
