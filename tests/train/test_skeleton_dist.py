"""The skeleton on 2 gloo ranks: metrics reduced before logging, a barrier after each save, a NaN
on one rank stops every rank at the loss check, rank 0's weights everywhere, an eval that fails on
one rank loses no step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rlhfkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("skeleton_worker.py")


def _spawn(out: Path, mode: str = "", prepare=None) -> list[dict]:
    """Each attempt in a fresh folder under ``out`` that ``prepare(folder)`` fills first; its results."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # gloo can abort at exit; the results are written before teardown
        folder = out / f"{mode or 'plain'}-{attempt}"
        folder.mkdir()
        if prepare is not None:
            prepare(folder)
        done = subprocess.run([sys.executable, str(WORKER), str(folder), *([mode] if mode else [])], env=env,
                              timeout=120, capture_output=True, text=True)
        (folder / "stderr.txt").write_text(done.stderr)
        results = [folder / f"rank{r}{'-' + mode if mode else ''}.json" for r in range(2)]
        if all(f.is_file() for f in results):
            return folder, [json.loads(f.read_text()) for f in results]
    raise AssertionError(f"the 2-rank worker wrote no results: {done.stderr[-3000:]}")


def test_two_ranks_through_the_skeleton(tmp_path):
    out, ranks = _spawn(tmp_path)
    plain = [r["plain"] for r in ranks]
    assert plain[0]["start_weight"] == plain[1]["start_weight"]  # broadcast from rank 0
    logged = [m for m in read_metrics(out / "plain") if "train/local" in m]
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
    checkpointed before its eval, so a resumed run runs that eval again and ends as a straight run.
    save_every is 100: step 2's checkpoint, completed after its eval, is kept only until step 4's."""
    failed_in, failed = _spawn(tmp_path, "eval-fails")
    assert failed[1]["error"].startswith("MemoryError") and "error" in failed[0]
    said = (failed_in / "stderr.txt").read_text()  # rank 0 says once that eval steps are saved
    assert said.count("every eval step (eval_every=2) is also checkpointed, before its eval") == 1
    checkpoint = failed_in / "resumed" / "checkpoints" / "step-0000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["pending_eval"] is True and state["evals"] == [] and (checkpoint / "TRANSIENT").is_file()
    assert [m["step"] for m in read_metrics(failed_in / "resumed") if "train/local" in m] == [1, 2]
    out, ranks = _spawn(tmp_path, "eval-resumes", lambda f: shutil.copytree(failed_in / "resumed", f / "resumed"))
    killed = ranks[0]["killed"]["state"]
    assert killed["pending_eval"] is False and killed["rng_after_eval"] and [e["step"] for e in killed["evals"]] == [2]
    for r in ranks:  # "amended": a run killed in step 3, resumed from step 2's completed checkpoint
        straight = r["straight"]
        assert r["killed"]["error"].startswith("Killed")
        for resumed in (r["resumed"], r["amended"]):
            assert "error" not in resumed and "error" not in straight
            assert [e["step"] for e in resumed["evals"]] == [2, 4] and resumed["evals"] == straight["evals"]
            assert resumed["weight"] == straight["weight"]
    untimed = [[{k: v for k, v in m.items() if k != "time_s"} for m in read_metrics(out / run)]
               for run in ("resumed", "straight", "amended")]
    assert untimed[0] == untimed[1] == untimed[2]  # every step and eval logged once, in the same order
    for run in ("resumed", "straight", "amended"):  # the transient step-2 checkpoint went once step 4's was complete
        assert [p.name for p in (out / run / "checkpoints").iterdir()] == ["step-0000004"]
    for r in ranks:  # every rank stops with rank 0, and the early stop's last step is logged, once
        assert r["stop-failed"]["error"].startswith("MemoryError") and "error" not in r["stopped"]
        assert [e["step"] for e in r["stopped"]["evals"]] == [2]
    assert [(m["step"], "eval/score" in m) for m in read_metrics(out / "stop")] == [(2, True), (2, False)]
