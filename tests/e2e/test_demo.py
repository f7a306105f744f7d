import json
import os

from rlhfkit.cli.demo import NEEDS, STAGES, format_table, run_demo


def test_demo_stages_run_in_worker_processes_and_report_the_wall_time(tmp_path):
    summary = run_demo(tmp_path / "demo", stages=["base"], jobs=2)
    assert summary["base"]["accuracy"] == 0.0  # the random base model answers nothing right
    notes = summary["_notes"]
    cpus = len(os.sched_getaffinity(0))
    assert notes["jobs"] == 2 and notes["threads_per_job"] == max(1, min(cpus // 2, 4))
    assert notes["wall_seconds"] >= summary["base"]["seconds"]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["base"] == summary["base"]
    assert f"wall time {notes['wall_seconds']} s" in format_table(summary)


def test_every_stage_needs_only_stages_listed_before_it():
    order = list(STAGES)
    for stage, needs in NEEDS.items():
        assert all(order.index(n) < order.index(stage) for n in needs), stage
