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


def test_optional_stages_run_only_when_named_and_train_from_the_start_model(tiny, tmp_path):
    """ORPO, SimPO and online DPO are demo stages run only with --stages; each trains from the
    ctx's start model (here the tiny base) and reports its held-out figures (quick: half the steps).
    SimPO's stage is ORPO's function with cpo_tiny's settings: not run again here."""
    from rlhfkit.cli.demo import OPTIONAL
    from rlhfkit.data.rows import read_rows

    assert set(OPTIONAL) == {"orpo", "simpo", "online_dpo"} and all(NEEDS[s] == ("sft",) for s in OPTIONAL)
    ctx = {"out": tmp_path, "assets": {"data": tiny["data"], "base": tiny["base"]}, "quick": True, "seed": 0,
           "progress": False, "start_model": str(tiny["base"]), "eval_limit": 100,
           "eval_rows": read_rows(tiny["data"] / "sft_eval.jsonl")}
    orpo = STAGES["orpo"](ctx)
    # from the random base 0.538 -> 0.580 (measured): the odds-ratio term orders the held-out pairs better
    assert orpo["steps"] == 75 and orpo["preference_accuracy"] > orpo["preference_accuracy_before"] + 0.02
    online = STAGES["online_dpo"](ctx)
    assert online["steps"] == 50 and online["accuracy_before"] == 0.0  # the random base answers nothing right
