"""The skeleton on 2 gloo ranks: metrics reduced before logging, a barrier after each save, a NaN
on one rank stops every rank at the loss check, rank 0's weights everywhere, an eval that fails on
one rank loses no step."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rlhfkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("skeleton_worker.py")


def _spawn(out: Path, mode: str = "") -> list[dict]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    results = [out / f"rank{r}{'-' + mode if mode else ''}.json" for r in range(2)]
    for attempt in range(2):  # gloo can abort at exit; the results are written before teardown
        done = subprocess.run([sys.executable, str(WORKER), str(out), *([mode] if mode else [])], env=env,
                              timeout=120, capture_output=True, text=True)
        (out / f"stderr{'-' + mode if mode else ''}.txt").write_text(done.stderr)
        if all(f.is_file() for f in results):
            return [json.loads(f.read_text()) for f in results]
    raise AssertionError("the 2-rank worker wrote no results")


def test_two_ranks_through_the_skeleton(tmp_path):
    ranks = _spawn(tmp_path)
    plain = [r["plain"] for r in ranks]
    assert plain[0]["start_weight"] == plain[1]["start_weight"]  # broadcast from rank 0
    logged = [m for m in read_metrics(tmp_path / "plain") if "train/local" in m]
    # means: (rank 0's 0 + step, rank 1's 10 + step) / 2; shares: 1 + 2 summed
    assert [m["train/local"] for m in logged] == [5.0, 6.0, 7.0]
    assert [m["train/part"] for m in logged] == [3.0, 3.0, 3.0]
    # each rank's losses: 0.5 * w.(r+1, r+1, r+1) + b; the logged loss is their sum over ranks
    for r in plain:  # right after step_done every rank sees the checkpoint rank 0 wrote
        assert r["checkpoints"] == ["step-0000001", "step-0000002", "step-0000003"]
    nan = [r["nan"] for r in ranks]
    for r in nan:  # both ranks stop at the loss check of step 2 (rank 0 never saw a NaN itself)
        assert r["error"].startswith("step 2: the loss is nan"), r
        assert r["checkpoints"] == ["step-0000001"]


def test_an_eval_that_fails_on_one_rank_keeps_its_steps_training_in_a_checkpoint(tmp_path):
    """Rank 1's eval fails at step 2 while rank 0 waits inside the eval's collective: the step was
    checkpointed before its eval, so a resumed run runs that eval again and ends as a straight run."""
    failed = _spawn(tmp_path, "eval-fails")
    assert failed[1]["error"].startswith("MemoryError") and "error" in failed[0]
    said = (tmp_path / "stderr-eval-fails.txt").read_text()  # rank 0 says once that eval steps are saved
    assert said.count("every eval step (eval_every=2) is also checkpointed, before its eval") == 1
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-0000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["pending_eval"] is True and state["evals"] == []  # save_every is 100: only the eval saved it
    assert [m["step"] for m in read_metrics(tmp_path / "resumed") if "train/local" in m] == [1, 2]
    ranks = _spawn(tmp_path, "eval-resumes")
    for r in ranks:  # "amended": the straight run resumed from its step-2 checkpoint (its eval not run again)
        straight = r["straight"]
        for resumed in (r["resumed"], r["amended"]):
            assert "error" not in resumed and "error" not in straight
            assert [e["step"] for e in resumed["evals"]] == [2, 4] and resumed["evals"] == straight["evals"]
            assert resumed["weight"] == straight["weight"]
    untimed = [[{k: v for k, v in m.items() if k != "time_s"} for m in read_metrics(tmp_path / run)]
               for run in ("resumed", "straight", "amended")]
    assert untimed[0] == untimed[1] == untimed[2]  # every step and eval logged once, in the same order
    for run in ("resumed", "straight"):  # each eval's checkpoint, completed after it ran
        for step, evals in ((2, [2]), (4, [2, 4])):
            state = json.loads((tmp_path / run / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").read_text())
            assert state["pending_eval"] is False and [e["step"] for e in state["evals"]] == evals
