"""The skeleton on 2 gloo ranks: metrics reduced before logging, a barrier after each save, a NaN
on one rank stops every rank at the loss check, rank 0's weights everywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rlhfkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("skeleton_worker.py")


def _spawn(out: Path) -> list[dict]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # gloo can abort at exit; the results are written before teardown
        subprocess.run([sys.executable, str(WORKER), str(out)], env=env, timeout=120, capture_output=True)
        if all((out / f"rank{r}.json").is_file() for r in range(2)):
            return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
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
