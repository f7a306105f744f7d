"""Faults a run must survive (issue #17): resume that is exact in every set-up, no debris left,
no stuck folders, failed saves that clean up, nonsense config values and wrong models refused
before any model loads, each in one line."""

import errno
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_killed_in_step
from methods_setup import RUNS, method_config, reward_folder, small

import rlhfkit.train.checkpoint as checkpoint_module
import rlhfkit.train.run as run_module
from rlhfkit.methods.distill import DistillConfig
from rlhfkit.methods.dpo import DPOConfig, run_dpo
from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.methods.kto import KTOConfig
from rlhfkit.methods.ppo import PPOConfig, run_ppo
from rlhfkit.methods.prm import PRMConfig
from rlhfkit.methods.rm import RMConfig
from rlhfkit.methods.sft import SFTConfig, run_sft
from rlhfkit.models.load import ModelLoadError, load_tokenizer
from rlhfkit.rollout.backend import SamplerBackend
from rlhfkit.rollout.evaluate import greedy_samples
from rlhfkit.rollout.sampler import decode
from rlhfkit.train.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint
from rlhfkit.train.config import ConfigError, load_config, replace
from rlhfkit.train.logging import MetricsLogger, read_metrics, truncate_metrics
from rlhfkit.train.optim import build_optimizer, build_scheduler, hyperparameters, lr_factor, rebase_schedule


class Killed(BaseException):
    pass


def _kill_when(monkeypatch, name: str, done: int, after: bool = False):
    """Make ``Run.step_done`` of the run called ``name`` die when ``done`` steps are done
    (``after``: once the step is logged and checkpointed on cadence)."""
    original = run_module.Run.step_done

    def dies(self, *args, **kwargs):
        if self.name == name and self.done == (done - 1 if after else done):
            if after:
                original(self, *args, **kwargs)
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", dies)
    return original


def _straight_and_resumed(monkeypatch, run, cfg, tmp_path, name: str, killed_at: int):
    """(the summary of a straight run, that of a run killed in step ``killed_at`` and resumed)."""
    straight = run(cfg(tmp_path / "full"))
    original = _kill_when(monkeypatch, name, killed_at)
    with pytest.raises(Killed):
        run(cfg(tmp_path / "cut"))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    return straight, run(cfg(tmp_path / "cut", resume=True))


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --- 3. resume is exact in every set-up --------------------------------------------------------

def test_sft_snapshot_is_not_overwritten_by_a_later_model_after_resume(tiny, tmp_path, monkeypatch):
    def cfg(out):  # the snapshot is taken at step 1's eval; the checkpoint is step 2's
        return SFTConfig(model=str(tiny["base"]), train_data=small(tiny, "sft_train.jsonl"), max_length=64,
                         eval_data=small(tiny, "sft_eval.jsonl", 8), eval_max_new_tokens=4, snapshot_at_accuracy=0.0,
                         train=replace(method_config("sft", tiny, out, 4, save_every=2).train, eval_every=1))

    straight = run_sft(cfg(tmp_path / "full"))
    original = _kill_when(monkeypatch, "sft", 2)
    with pytest.raises(Killed):
        run_sft(cfg(tmp_path / "cut"))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    resumed = run_sft(replace(cfg(tmp_path / "cut"), train__resume=True))
    _same_weights(tmp_path / "full" / "snapshot", tmp_path / "cut" / "snapshot")  # step 1's model, not step 3's
    _same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    assert resumed["snapshot"]["accuracy"] == straight["snapshot"]["accuracy"]
    evals = [m for m in read_metrics(tmp_path / "full") if any(k.startswith("eval/") for k in m)]
    assert len(evals) == 4 and all("eval/step" not in m and "eval/accuracy" in m for m in evals)  # step once, its own
    card = (tmp_path / "full" / "snapshot" / "README.md").read_text()  # the snapshot's own eval, not the last one
    assert "| step | 1 |" in card and f"| eval/accuracy | {straight['snapshot']['accuracy']:.4g} |" in card


def test_grpo_accuracy_before_is_the_start_models_after_resume(tiny, tmp_path, monkeypatch):
    # Held-out rows whose reference is the start model's own greedy answer: accuracy 1.0 before
    # training, less once the weights move (lr 1e-2), so a checkpoint's accuracy would differ.
    tok = load_tokenizer(tiny["base"])
    from rlhfkit.methods.common import load_policy

    model, _ = load_policy(str(tiny["base"]), None)
    prompts = [json.loads(line) for line in (tiny["data"] / "prompts_eval.jsonl").read_text().splitlines()[:40]]
    from rlhfkit.data.rows import read_rows

    (sample,) = greedy_samples(SamplerBackend(tok, model), tok, read_rows(prompts), 6)
    rows = [{"prompt": p["prompt"], "completion": c} for p, c in zip(prompts, decode(tok, sample)) if c.strip()]
    eval_file = tmp_path / "own.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(out):
        return replace(method_config("grpo", tiny, out, 4, save_every=2), eval_data=str(eval_file), train__lr=1e-2,
                       eval_task="reference", eval_max_new_tokens=6)

    straight = run_grpo(cfg(tmp_path / "full"), reward_fns=[RUNS_DIGITS])
    original = _kill_when(monkeypatch, "grpo", 2)
    with pytest.raises(Killed):
        run_grpo(cfg(tmp_path / "cut"), reward_fns=[RUNS_DIGITS])
    monkeypatch.setattr(run_module.Run, "step_done", original)
    resumed = run_grpo(replace(cfg(tmp_path / "cut"), train__resume=True), reward_fns=[RUNS_DIGITS])
    assert straight["accuracy_before"] == resumed["accuracy_before"] == 1.0
    assert straight["accuracy"] < 1.0 and resumed["accuracy"] == straight["accuracy"]


def RUNS_DIGITS(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# --- 4. no debris, no stuck folders ------------------------------------------------------------

def test_resume_truncates_the_metrics_log_and_removes_stale_temporary_folders(tiny, tmp_path, monkeypatch):
    RUNS["sft"](method_config("sft", tiny, tmp_path / "full", 5, save_every=2))
    original = _kill_when(monkeypatch, "sft", 3, after=True)  # step 3 logged, the last checkpoint is step 2's
    with pytest.raises(Killed):
        RUNS["sft"](method_config("sft", tiny, tmp_path / "cut", 5, save_every=2))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [1, 2, 3]
    stale = tmp_path / "cut" / "checkpoints" / "step-0000004.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")  # a save killed half-way
    half_amended = tmp_path / "cut" / "checkpoints" / "step-0000002" / "trainer_state.json.tmp"
    half_amended.write_text("{")  # an amend (checkpoint.amend) killed before its rename
    RUNS["sft"](replace(method_config("sft", tiny, tmp_path / "cut", 5, save_every=2), train__resume=True))
    assert not stale.exists() and not half_amended.exists()
    logged = read_metrics(tmp_path / "cut")
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]  # step 3 once, not twice
    assert [m["train/loss"] for m in logged] == [m["train/loss"] for m in read_metrics(tmp_path / "full")]


def test_a_line_averages_the_steps_since_the_last_and_a_resume_keeps_the_window(tiny, tmp_path, monkeypatch):
    """log_every=3 over 7 steps: lines at 3, 6 and 7, each the mean of its steps' losses (the same
    run logged every step), lr and optimizer_steps as at the line's step. Killed in step 6 after the
    checkpoint of step 5 (mid-window: steps 4 and 5 in it), the resumed run writes the straight
    run's lines exactly."""
    def cfg(out, log_every, resume=False):
        return replace(method_config("sft", tiny, out, 7, save_every=5, log_every=log_every, warmup_steps=2),
                       train__resume=resume, train__schedule="linear")

    RUNS["sft"](cfg(tmp_path / "each", 1))
    each = read_metrics(tmp_path / "each")
    RUNS["sft"](cfg(tmp_path / "three", 3))
    three = read_metrics(tmp_path / "three")
    assert [m["step"] for m in three] == [3, 6, 7]
    for line, window in zip(three, ([1, 2, 3], [4, 5, 6], [7])):
        steps = [each[i - 1] for i in window]
        assert line["train/loss"] == pytest.approx(sum(m["train/loss"] for m in steps) / len(steps), rel=1e-12)
        assert line["train/lr"] == steps[-1]["train/lr"] and line["train/optimizer_steps"] == window[-1]
    assert three[0]["train/loss"] != each[2]["train/loss"]  # not the step's own value

    run_killed_in_step(monkeypatch, 6, lambda: RUNS["sft"](cfg(tmp_path / "cut", 3)))
    RUNS["sft"](cfg(tmp_path / "cut", 3, resume=True))
    resumed = read_metrics(tmp_path / "cut")
    assert [{k: v for k, v in m.items() if k != "time_s"} for m in resumed] == \
        [{k: v for k, v in m.items() if k != "time_s"} for m in three]


def test_a_preempted_step_off_the_log_cadence_is_logged_and_the_resumed_run_writes_the_straight_runs_lines(
        tiny, tmp_path, monkeypatch):
    """SIGTERM in step 4 of 7, log_every=3: the preempted run logs step 4 (an interim line, so that a
    run never resumed loses no step), and its checkpoint keeps steps 4's window; the resumed run drops
    that line and writes the straight run's lines, 3, 6 and 7, with the same values."""
    def cfg(out, resume=False):
        return replace(method_config("sft", tiny, out, 7, save_every=100, log_every=3), train__resume=resume)

    RUNS["sft"](cfg(tmp_path / "straight"))
    original = run_module.Run.step_done

    def signalled(self, *args, **kwargs):
        if self.done == 3:
            self.signal = 15  # SIGTERM arrived during step 4
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", signalled)
    with pytest.raises(run_module.Preempted):
        RUNS["sft"](cfg(tmp_path / "cut"))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [3, 4]
    RUNS["sft"](cfg(tmp_path / "cut", resume=True))

    def lines(out):
        return [{k: v for k, v in m.items() if k != "time_s"} for m in read_metrics(out)]

    assert [m["step"] for m in lines(tmp_path / "cut")] == [3, 6, 7]
    assert lines(tmp_path / "cut") == lines(tmp_path / "straight")


def test_a_checkpoint_written_before_log_windows_resumes(tiny, tmp_path):
    """A checkpoint of session 34's format (no log_window, NaN metrics saved as null) resumes: its
    step was logged, so the next line averages the steps after it; a null is read as NaN."""
    RUNS["sft"](method_config("sft", tiny, tmp_path / "run", 4, save_every=2, log_every=2))
    kept, last = complete_checkpoints(tmp_path / "run")
    shutil.rmtree(last)
    state_file = kept / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("log_window", "interim_line"):
        state.pop(key)
    state["metrics"]["grad_norm"] = None
    state_file.write_text(json.dumps(state))
    RUNS["sft"](replace(method_config("sft", tiny, tmp_path / "run", 4, save_every=2, log_every=2), train__resume=True))
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2, 4]


def test_window_means_by_hand():
    nan = float("nan")
    window = [{"loss": 1.0, "grad_norm": 3.0, "reward_mean": nan, "completion_len_max": 5.0, "lr": 1e-3,
               "optimizer_steps": 1},
              {"loss": 2.0, "reward_mean": 0.5, "completion_len_max": 9.0, "lr": 2e-3, "optimizer_steps": 1},
              {"loss": 6.0, "reward_mean": 1.5, "completion_len_max": 7.0, "lr": 3e-3, "optimizer_steps": 2}]
    line = run_module.window_means(window)
    assert list(line) == ["loss", "reward_mean", "completion_len_max", "lr", "optimizer_steps", "grad_norm"]
    assert line == {"loss": 3.0, "reward_mean": 1.0, "completion_len_max": 9.0, "lr": 3e-3, "optimizer_steps": 2,
                    "grad_norm": 3.0}  # grad_norm: the one step that had it (a skipped update has none)
    assert math.isnan(run_module.window_means([{"reward_mean": nan}, {"reward_mean": nan}])["reward_mean"])


@pytest.mark.parametrize("resume", [True, False, "auto"])
def test_a_run_killed_before_its_first_checkpoint_starts_afresh(resume, tiny, tmp_path, monkeypatch, capfd):
    def cfg(**kw):  # saves only at the end; evaluates every step
        return replace(method_config("sft", tiny, tmp_path / "k", 3, **kw), train__eval_every=1,
                       eval_data=small(tiny, "sft_eval.jsonl", 8), eval_max_new_tokens=4)

    original = _kill_when(monkeypatch, "sft", 1, after=True)
    with pytest.raises(Killed):
        RUNS["sft"](cfg())
    monkeypatch.setattr(run_module.Run, "step_done", original)
    assert latest_checkpoint(tmp_path / "k") is None and (tmp_path / "k" / "metrics.jsonl").exists()
    assert (tmp_path / "k" / "eval_samples.jsonl").exists()
    capfd.readouterr()
    summary = RUNS["sft"](cfg(resume=resume))
    assert summary["steps"] == 3 and [m["step"] for m in read_metrics(tmp_path / "k") if "train/loss" in m] == [1, 2, 3]
    shown = (tmp_path / "k" / "eval_samples.jsonl").read_text().splitlines()  # the killed run's step 1 went too
    assert [json.loads(line)["step"] for line in shown] == [1] * 8 + [2] * 8 + [3] * 8
    said = [line for line in capfd.readouterr().err.splitlines() if "afresh" in line]
    assert said == [f"{tmp_path / 'k'}: no complete checkpoint to resume from; starting afresh"]
    with pytest.raises(CheckpointError, match="already holds a run"):  # now it has one: not overwritten
        RUNS["sft"](method_config("sft", tiny, tmp_path / "k", 3))


def test_dpo_killed_in_its_sft_phase_resumes_that_phase_and_matches_the_straight_run(tiny, tmp_path, monkeypatch):
    def cfg(out):
        return replace(method_config("dpo", tiny, out, 3, save_every=2), sft_first_steps=4)

    run_dpo(cfg(tmp_path / "full"))
    original = _kill_when(monkeypatch, "dpo-sft", 3)  # inside the SFT phase, after its step-2 checkpoint
    with pytest.raises(Killed):
        run_dpo(cfg(tmp_path / "cut"))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    run_dpo(replace(cfg(tmp_path / "cut"), train__resume=True))  # before: "no complete checkpoint", stuck
    for sub in ("sft_chosen", ""):
        full, cut = (read_metrics(tmp_path / p / sub) for p in ("full", "cut"))
        assert [m["train/loss"] for m in cut] == [m["train/loss"] for m in full] and len(full) in (3, 4)
    _same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")


def test_a_resumed_or_relaunched_run_ends_with_the_straight_runs_summary(tiny, tmp_path, monkeypatch):
    """Evals and the last metrics are in the checkpoint: result.json after a resume lists every
    eval, and a finished run relaunched with resume=auto writes the same summary again."""
    def cfg(out, resume=False):
        return replace(method_config("sft", tiny, out, 4, save_every=2, resume=resume), train__eval_every=1,
                       eval_data=small(tiny, "sft_eval.jsonl", 8), eval_max_new_tokens=4)

    straight, resumed = _straight_and_resumed(monkeypatch, run_sft, cfg, tmp_path, "sft", 3)
    assert [e["step"] for e in straight["evals"]] == [1, 2, 3, 4] and resumed["evals"] == straight["evals"]
    assert resumed["loss"] == straight["loss"] is not None
    shown = {run: [json.loads(line) for line in (tmp_path / run / "eval_samples.jsonl").read_text().splitlines()]
             for run in ("full", "cut")}  # 8 held-out answers an eval, each eval's once after the resume too
    assert shown["cut"] == shown["full"] and [r["step"] for r in shown["full"]] == [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8
    from rlhfkit.data.rows import read_rows

    eval_rows = read_rows(small(tiny, "sft_eval.jsonl", 8))
    assert [r["prompt"] for r in shown["full"][:8]] == [row.data["prompt"] for row in eval_rows[:8]]
    assert {type(r["completion"]) for r in shown["full"]} == {str} and "target" in shown["full"][0]
    relaunched = run_sft(cfg(tmp_path / "full", resume="auto"))
    assert relaunched == straight == json.loads((tmp_path / "full" / "result.json").read_text())


def test_the_start_models_answers_are_step_0_of_eval_samples_once_across_a_resume(tiny, tmp_path, monkeypatch):
    """GRPO's eval of the start model ("before") writes its 8 answers as step 0: once, though the
    resumed run evaluates the start model again; then each eval's as SFT's."""
    from rlhfkit.methods.grpo import run_grpo

    def cfg(out, resume=False):
        return replace(method_config("grpo", tiny, out, 4, save_every=2, resume=resume), train__eval_every=2,
                       eval_data=small(tiny, "prompts_eval.jsonl", 8), eval_max_new_tokens=4)

    _straight_and_resumed(monkeypatch, run_grpo, cfg, tmp_path, "grpo", 3)
    shown = {run: [json.loads(line) for line in (tmp_path / run / "eval_samples.jsonl").read_text().splitlines()]
             for run in ("full", "cut")}
    assert [r["step"] for r in shown["full"]] == [0] * 8 + [2] * 8 + [4] * 8
    assert shown["cut"] == shown["full"]
    # killed in its first step, before metrics.jsonl: the step-0 answers alone are there, and a
    # relaunch (resume=false) starts afresh without them (it kept them and wrote them again)
    original = _kill_when(monkeypatch, "grpo", 0)
    with pytest.raises(Killed):
        run_grpo(cfg(tmp_path / "first"))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    assert not (tmp_path / "first" / "metrics.jsonl").exists()
    assert len((tmp_path / "first" / "eval_samples.jsonl").read_text().splitlines()) == 8
    run_grpo(cfg(tmp_path / "first"))
    again = [json.loads(line) for line in (tmp_path / "first" / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [0] * 8 + [2] * 8 + [4] * 8


def test_an_early_stop_is_kept_on_resume_and_its_step_logged(tiny, tmp_path):
    """A run that an eval stopped (stop_at_accuracy) stays stopped when relaunched with resume:
    no further step, the same model; its last step's training metrics are in the log."""
    def cfg(resume=False):
        return replace(method_config("sft", tiny, tmp_path / "run", 4, log_every=5, resume=resume), train__eval_every=2,
                       eval_data=small(tiny, "sft_eval.jsonl", 8), eval_max_new_tokens=4, stop_at_accuracy=0.0)

    first = run_sft(cfg())
    assert first["steps"] == 2
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m] == [2]
    weights = _weights(tmp_path / "run" / "model")
    again = run_sft(cfg(resume=True))
    assert again["steps"] == 2 and again["evals"] == first["evals"]
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-0000002"]
    assert all(torch.equal(v, _weights(tmp_path / "run" / "model")[k]) for k, v in weights.items())
    on = run_sft(replace(cfg(resume=True), stop_at_accuracy=None))  # no stop criterion now: it trains on
    assert on["steps"] == 4 and [e["step"] for e in on["evals"]] == [2, 4]


def test_an_eval_that_fails_keeps_its_steps_training_in_a_checkpoint(tiny, tmp_path, monkeypatch):
    import rlhfkit.methods.sft as sft_module

    def fails(*args, **kwargs):
        raise MemoryError("out of memory in the eval")

    monkeypatch.setattr(sft_module, "heldout_loss", fails)
    cfg = replace(method_config("sft", tiny, tmp_path / "run", 3, save_every=100), train__eval_every=3,
                  eval_data=small(tiny, "sft_eval.jsonl", 8))
    with pytest.raises(MemoryError):
        run_sft(cfg)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"
    monkeypatch.undo()  # the resumed run runs the eval the failure interrupted, then ends as a straight run
    resumed = run_sft(replace(cfg, train__resume=True))
    straight = run_sft(replace(cfg, train__out_dir=str(tmp_path / "straight")))
    assert [e["step"] for e in resumed["evals"]] == [3] and resumed == straight


def _linear_checkpoint(out, step: int, **kwargs):
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model, 0.1)
    scheduler = build_scheduler(optimizer, 8, 0, "constant")
    path = checkpoint_module.save_checkpoint(out, step, model, optimizer, scheduler, {}, **kwargs)
    return path, (model, optimizer, scheduler)


def test_an_amend_that_fails_leaves_the_checkpoint_as_written_before_its_eval(tmp_path, monkeypatch):
    path, modules = _linear_checkpoint(tmp_path, 2, extra={"pending_eval": True})
    before_eval = torch.rand(3)  # what a resumed run draws first from the RNG as saved
    replace = checkpoint_module.os.replace

    def full_disk(src, dst):
        if Path(dst).name == "trainer_state.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*stays as written before the eval"):
        checkpoint_module.amend_checkpoint(path, {"pending_eval": False})
    monkeypatch.undo()
    assert not list(path.glob("*.tmp"))  # nothing half-written left in the folder
    state = checkpoint_module.load_checkpoint(path, *modules)  # the after-eval RNG file is there, but not read
    assert state["pending_eval"] is True and "rng_after_eval" not in state
    assert torch.equal(torch.rand(3), before_eval)
    checkpoint_module.amend_checkpoint(path, {"pending_eval": False})
    after_eval = torch.rand(3)
    state = checkpoint_module.load_checkpoint(path, *modules)
    assert state["pending_eval"] is False and state["rng_after_eval"] and torch.equal(torch.rand(3), after_eval)


def test_a_checkpoint_written_for_an_eval_is_kept_until_a_later_one_and_not_counted_in_keep(tmp_path):
    def names():
        return [int(p.name.split("-")[1]) for p in complete_checkpoints(tmp_path)]

    for step, transient in ((2, False), (4, False), (5, True)):
        _linear_checkpoint(tmp_path, step, keep=2, transient=transient)
    assert names() == [2, 4, 5]  # keep=2 counts 2 and 4
    _linear_checkpoint(tmp_path, 6, keep=2, transient=True)
    assert names() == [2, 4, 6]
    _linear_checkpoint(tmp_path, 8, keep=2)
    assert names() == [4, 8]


def test_a_checkpoint_is_on_disk_file_marker_rename_in_that_order_before_an_older_one_goes(tmp_path, monkeypatch):
    root = checkpoint_module.checkpoint_dir(tmp_path)
    for step in (2, 4):
        _linear_checkpoint(tmp_path, step, keep=2)
    events, fsync = [], checkpoint_module.os.fsync

    def record(fd):  # what is on disk, and what the folder looks like when it is made so
        path = Path(checkpoint_module.os.readlink(f"/proc/self/fd/{fd}"))
        events.append((path, sorted(p.name for p in root.iterdir())))
        return fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", record)
    _linear_checkpoint(tmp_path, 6, keep=2)
    synced = [path for path, _ in events]
    tmp, final = root / "step-0000006.tmp", root / "step-0000006"
    marker = synced.index(tmp / checkpoint_module.MARKER)
    assert {tmp / "model.safetensors", tmp / "optimizer.pt", tmp / "trainer_state.json", tmp} <= set(synced[:marker])
    assert synced[marker + 1:] == [tmp, root]  # the marker's name, then the rename, each on disk
    assert events[-1][1] == ["step-0000002", "step-0000004", "step-0000006"]  # renamed; nothing removed yet
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000004", "step-0000006"]
    assert final.is_dir()


def test_resuming_from_a_pending_eval_drops_the_lines_its_step_logs_again(tmp_path):
    """The eval line of the checkpoint's step, and its train line where the checkpoint had it unlogged
    (an early stop, on several ranks, logs it after the eval)."""
    lines = [{"step": 1, "train/loss": 1.0}, {"step": 2, "eval/accuracy": 0.5}, {"step": 2, "train/loss": 2.0},
             {"step": 3, "train/loss": 3.0}]
    for pending, logged, kept in ((False, True, lines[:3]), (True, True, [lines[0], lines[2]]),
                                  (True, False, lines[:1])):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        truncate_metrics(tmp_path, 2, pending_eval=pending, step_logged=logged)
        assert read_metrics(tmp_path) == kept


def test_a_checkpoint_an_eval_failure_wrote_off_save_every_goes_once_a_later_one_is_complete(tiny, tmp_path,
                                                                                             monkeypatch):
    import rlhfkit.methods.sft as sft_module

    heldout_loss = sft_module.heldout_loss

    def fails_at_step_2(model, *args, **kwargs):
        if not (tmp_path / "run" / "checkpoints").is_dir():
            raise MemoryError("out of memory in the eval")
        return heldout_loss(model, *args, **kwargs)

    monkeypatch.setattr(sft_module, "heldout_loss", fails_at_step_2)
    cfg = replace(method_config("sft", tiny, tmp_path / "run", 4, save_every=100, keep_checkpoints=0), train__eval_every=2,
                  eval_data=small(tiny, "sft_eval.jsonl", 8))
    with pytest.raises(MemoryError):
        run_sft(cfg)
    assert (latest_checkpoint(tmp_path / "run") / checkpoint_module.TRANSIENT).is_file()
    resumed = run_sft(replace(cfg, train__resume=True))
    assert [e["step"] for e in resumed["evals"]] == [2, 4]
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-0000004"]  # though keep_checkpoints=0


def test_the_logged_lr_is_the_rate_each_step_took(tiny, tmp_path):
    """Linear schedule, 2 warm-up steps of 4, lr 1e-3: the steps take 5e-4, 1e-3, 1e-3, 5e-4."""
    run_sft(replace(method_config("sft", tiny, tmp_path / "run", 4, warmup_steps=2), train__schedule="linear"))
    logged = [m["train/lr"] for m in read_metrics(tmp_path / "run") if "train/lr" in m]
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], abs=1e-12)


def test_a_resume_that_changes_what_the_steps_were_trained_with_is_refused_before_any_model_loads(tiny, tmp_path,
                                                                                                   capfd):
    """The checkpoint's scheduler would keep its lr and its place in the data would be applied to
    other rows: a changed lr or data is one line naming the keys; a longer run and another log
    cadence go on, and say so."""
    cfg = method_config("sft", tiny, tmp_path / "run", 2)
    run_sft(cfg)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(Path(cfg.train_data).read_text().splitlines(keepends=True)[:16]))
    with pytest.raises(ConfigError, match=r"train_data: '.*' -> '.*other\.jsonl'; train\.lr: 0\.001 -> 0\.01\).*another train\.out_dir"):
        run_sft(replace(cfg, train__resume=True, train__max_steps=4, train__lr=1e-2, train_data=str(other)))
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m] == [1, 2]  # nothing ran
    capfd.readouterr()
    same_data = str(Path(cfg.train_data).parent / ".." / Path(cfg.train_data).parent.name / Path(cfg.train_data).name)
    run_sft(replace(cfg, train__resume=True, train__max_steps=4, train__log_every=2, train_data=same_data))
    err = capfd.readouterr().err  # the same file by another path is no change
    assert "train.max_steps: 2 -> 4; train.log_every: 1 -> 2 (the lr schedule runs to the new length" in err
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m] == [1, 2, 4]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_steps"] == 4
    run_sft(replace(cfg, train__resume="force", train__max_steps=5, train__log_every=2, train_data=str(other)))
    assert "train_data: " in capfd.readouterr().err  # forced: said, not refused
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m] == [1, 2, 4, 5]


def test_a_resumed_run_takes_its_configs_schedule_length_lr_and_clock_from_its_first_step(tiny, tmp_path):
    """Two warm-up steps, then linear decay from lr 1e-3 over 4 steps: 5e-4, 1e-3, 1e-3, 5e-4.
    Resumed to 6 steps, the schedule runs to the new length from the first resumed step (step 5:
    1e-3 (1 - 2/4)), not from the second (the old schedule's step 5 was 0); forced to lr 1e-2 over
    10, steps 7 to 10 take 1e-2 (1 - (s - 3)/8). time_s goes on from the last logged line instead
    of restarting at 0."""
    cfg = replace(method_config("sft", tiny, tmp_path / "run", 4, warmup_steps=2), train__schedule="linear")
    run_sft(cfg)
    run_sft(replace(cfg, train__resume=True, train__max_steps=6))
    run_sft(replace(cfg, train__resume="force", train__max_steps=10, train__lr=1e-2))
    lines = [m for m in read_metrics(tmp_path / "run") if "train/lr" in m]
    assert [m["train/lr"] for m in lines] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 5e-3, 3.75e-3,
                                                             2.5e-3, 1.25e-3], rel=1e-9)
    times = [m["time_s"] for m in lines]
    assert times == sorted(times)


def test_rebase_schedule_gives_the_configs_decay_and_keeps_an_unchanged_lr_to_the_bit():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, 1e-3, 0.1)
    sched = build_scheduler(opt, 10, 2, "cosine", 0.1)
    for _ in range(4):
        opt.step()
        sched.step()
    saved_opt, saved_sched, lr_then = opt.state_dict(), sched.state_dict(), opt.param_groups[0]["lr"]
    for lr, decay, total in ((1e-3, 0.1, 10), (2e-3, 0.5, 20)):
        again = build_optimizer(model, lr, decay)
        schedule = build_scheduler(again, total, 2, "cosine", 0.1)
        built = hyperparameters(again)
        again.load_state_dict(saved_opt)
        schedule.load_state_dict(saved_sched)
        rebase_schedule(again, schedule, built)
        want = lr_then if total == 10 else lr * lr_factor(4, total, 2, "cosine", 0.1)
        assert [g["lr"] for g in again.param_groups] == [want, want] and schedule.get_last_lr() == [want, want]
        assert [g["weight_decay"] for g in again.param_groups] == [decay, 0.0]  # biases never decay
        schedule.step()
        assert again.param_groups[0]["lr"] == pytest.approx(lr * lr_factor(5, total, 2, "cosine", 0.1), rel=1e-12)


def test_a_resume_to_a_length_below_the_checkpoint_is_refused_before_any_model_loads(tiny, tmp_path, monkeypatch,
                                                                                      capsys):
    cfg = method_config("sft", tiny, tmp_path / "run", 3)
    run_sft(cfg)
    capsys.readouterr()
    monkeypatch.setattr(run_module.Run, "attach", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"at optimizer step 3, past train\.max_steps=2; a resumed run cannot go back"):
        run_sft(replace(cfg, train__resume=True, train__max_steps=2))
    assert "resuming" not in capsys.readouterr().err  # no "resuming ... with train.max_steps: 3 -> 2" before it


def test_a_model_folder_appears_only_when_complete(tiny, tmp_path, monkeypatch):
    """Killed while the final model is written, a run leaves no model folder (or the earlier one
    whole), and the next save replaces it at once."""
    cfg = method_config("sft", tiny, tmp_path / "run", 2)
    original = run_module.write_model_card

    def dies(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(run_module, "write_model_card", dies)
    with pytest.raises(Killed):
        run_sft(cfg)
    assert not (tmp_path / "run" / "model").exists() and (tmp_path / "run" / "model.tmp").is_dir()
    monkeypatch.setattr(run_module, "write_model_card", original)
    run_sft(replace(cfg, train__resume=True))
    first = _weights(tmp_path / "run" / "model")
    run_sft(replace(cfg, train__resume=True, train__max_steps=3))
    monkeypatch.setattr(run_module, "write_model_card", dies)
    with pytest.raises(Killed):
        run_sft(replace(cfg, train__resume=True, train__max_steps=4))
    kept = _weights(tmp_path / "run" / "model")  # step 3's folder, whole
    assert (tmp_path / "run" / "model" / "README.md").is_file() and any(not torch.equal(kept[k], first[k]) for k in kept)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("model")) == ["model", "model.tmp"]


def test_tensorboard_shows_each_step_once_after_a_resume(tiny, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def cfg(resume=False):
        return method_config("sft", tiny, tmp_path / "run", 4, save_every=2, report_to="tensorboard", resume=resume)

    original = _kill_when(monkeypatch, "sft", 3, after=True)  # step 3 logged, its checkpoint never written
    with pytest.raises(Killed):
        run_sft(cfg())
    monkeypatch.setattr(run_module.Run, "step_done", original)
    run_sft(cfg(resume=True))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_tensorboard_shows_a_pending_steps_eval_once_after_a_resume(tmp_path):
    """Step 2's checkpoint was written before its eval, and rank 0 had logged that eval before the
    run died: resumed, the eval runs again; metrics.jsonl and TensorBoard each hold it once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path)
    for step in (1, 2):
        first.log(step, {"loss": float(step)})
    first.log(2, {"accuracy": 0.5}, prefix="eval")
    first.close()
    truncate_metrics(tmp_path, 2, pending_eval=True)
    again = MetricsLogger(tmp_path, resume_step=2, rewrite_step=True)
    again.log(2, {"accuracy": 0.5}, prefix="eval")
    again.log(3, {"loss": 3.0})
    again.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [2]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 2, 3]


def test_dpo_resumed_after_its_sft_phase_reports_the_same_start(tiny, tmp_path, monkeypatch):
    """The start model's metrics (the SFT-on-chosen model against itself as reference: preference
    accuracy 0.5) are kept in the checkpoints; a resumed run's model object is the untuned one."""
    def cfg(out, resume=False):
        return replace(method_config("dpo", tiny, out, 4, save_every=2, resume=resume), sft_first_steps=2,
                       eval_data=small(tiny, "prefs_eval.jsonl", 16))

    straight, resumed = _straight_and_resumed(monkeypatch, run_dpo, cfg, tmp_path, "dpo", 3)
    assert straight["preference_accuracy_before"] == 0.5 and resumed == straight
    from transformers import AutoTokenizer

    ppo = tmp_path / "ppo"  # PPO's critic folder: a tokenizer beside it, as its model card says
    RUNS["ppo"](method_config("ppo", tiny, ppo, 1))
    assert AutoTokenizer.from_pretrained(str(ppo / "critic")).get_vocab() == load_tokenizer(tiny["base"]).get_vocab()


# --- 6. a save that fails --------------------------------------------------------------------

def test_a_failed_save_removes_its_folder_keeps_the_last_checkpoint_and_says_why(tiny, tmp_path, monkeypatch):
    original, calls = checkpoint_module.save_model, {"n": 0}

    def full_disk(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            original(model, path)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(model, path)

    monkeypatch.setattr(checkpoint_module, "save_model", full_disk)
    out = tmp_path / "d"
    with pytest.raises(CheckpointError) as e:
        RUNS["sft"](method_config("sft", tiny, out, 3, save_every=1))
    assert str(e.value) == (f"cannot write checkpoint {out}/checkpoints/step-0000002: No space left on device "
                            f"(OSError); the partial folder was removed, the last complete checkpoint "
                            f"{out}/checkpoints/step-0000001 is kept")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    monkeypatch.setattr(checkpoint_module, "save_model", original)
    assert RUNS["sft"](replace(method_config("sft", tiny, out, 3, save_every=1), train__resume=True))["steps"] == 3


def test_a_full_tmpfs_stops_the_run_in_one_line_and_leaves_no_partial_folder(tiny, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(CheckpointError) as e:
            RUNS["sft"](method_config("sft", tiny, disk / "run", 30, save_every=1, keep_checkpoints=0))
        message = str(e.value)
        assert "\n" not in message and "no space left on device" in message.lower(), message
        assert message.startswith(f"cannot write checkpoint {disk}/run/checkpoints/step-") or \
            message.startswith(f"cannot write the final model {disk}/run/model")
        assert not [p for p in (disk / "run" / "checkpoints").iterdir() if ".tmp" in p.name]
        assert complete_checkpoints(disk / "run")  # the earlier ones are whole
    finally:
        import gc

        gc.collect()
        subprocess.run(["umount", "-l", str(disk)], check=True)


# --- 8. config values --------------------------------------------------------------------------

@pytest.mark.parametrize("cls, override, message", [
    (SFTConfig, "train.max_steps=0", "'train.max_steps' must be >= 1; got 0"),
    (SFTConfig, "train.log_every=0", "'train.log_every' must be >= 1; got 0"),
    (SFTConfig, "train.lr=-1e-3", "'train.lr' must be > 0; got -0.001"),
    (SFTConfig, "train.lr=.nan", "'train.lr' must be > 0; got nan"),
    (SFTConfig, "train.warmup_steps=-1", "'train.warmup_steps' must be >= 0; got -1"),
    (SFTConfig, "train.min_lr_ratio=2", "'train.min_lr_ratio' must be in [0, 1]; got 2.0"),
    (SFTConfig, "train.seed=-1", "'train.seed' must be >= 0; got -1"),
    (SFTConfig, "eval_limit=-1", "'eval_limit' must be >= 0; got -1"),
    (SFTConfig, "stop_at_accuracy=1.5", "'stop_at_accuracy' must be in [0, 1]; got 1.5"),
    (SFTConfig, "snapshot_at_accuracy=0.5", "snapshot_at_accuracy=0.5 is used by held-out evaluation (eval_data) only"),
    (SFTConfig, "eval_max_new_tokens=8 stop_at_accuracy=0.9 snapshot_at_accuracy=0.5",  # at once, with the way out
     "eval_max_new_tokens=8, stop_at_accuracy=0.9, snapshot_at_accuracy=0.5 are used by held-out evaluation (eval_data) "
     "only, which is off; turn it on, or leave them out (eval_max_new_tokens=16 stop_at_accuracy=null "
     "snapshot_at_accuracy=null)"),
    (PPOConfig, "ptx_coef=0.5", "PPO-ptx needs both ptx_data and ptx_coef > 0; got ptx_data=None, ptx_coef=0.5"),
    (PPOConfig, "ptx_data=x.jsonl", "PPO-ptx needs both ptx_data and ptx_coef > 0; got ptx_data='x.jsonl', ptx_coef=0.0"),
    (RMConfig, "max_length=1", "'max_length' must be >= 2; got 1"),
    (DPOConfig, "beta=-0.1", "'beta' must be > 0; got -0.1"),
    (GRPOConfig, "beta=-0.1", "'beta' must be >= 0; got -0.1"),
    (GRPOConfig, "mu=0", "'mu' must be >= 1; got 0"),
    (GRPOConfig, "max_new_tokens=0", "'max_new_tokens' must be >= 1; got 0"),
    (GRPOConfig, "temperature=-1", "'temperature' must be > 0 (greedy samples make a group G copies"),
    (GRPOConfig, "temperature=0", "'temperature' must be > 0 (greedy samples make a group G copies"),
    (GRPOConfig, "overlong_penalty=0.5", "overlong_penalty=0.5 is used by overlong_buffer > 0 only, which is off"),
    (PPOConfig, "kl_horizon=100", "kl_horizon=100 is used by the adaptive KL controller (target_kl) only"),
    (PRMConfig, "step_logprob_floor=-1", "step_logprob_floor=-1.0 is used by readout=likelihood only"),
    (PRMConfig, "num_labels=2 readout=likelihood", "num_labels=2 is used by readout=head only"),
    (GRPOConfig, "reward_errors=ignore", "'reward_errors' must be one of raise, zero; got 'ignore'"),
    (GRPOConfig, "reward_timeout_s=-1", "'reward_timeout_s' must be >= 0; got -1.0"),
    (GRPOConfig, "eps_low=0", "'eps_low' must be > 0; got 0.0"),
    (GRPOConfig, "top_p=0", "'top_p' must be in (0, 1]; got 0.0"),
    (GRPOConfig, "eps_high=.nan", "'eps_high' must be >= eps_low (0.2); got nan"),
    (PRMConfig, "step_logprob_floor=.nan", "'step_logprob_floor' must be in (-inf, 0.0]; got nan"),
    (PRMConfig, "step_logprob_floor=.inf", "'step_logprob_floor' must be in (-inf, 0.0]; got inf"),
    (PRMConfig, "eval_limit=-1", "'eval_limit' must be >= 0; got -1"),
    (PPOConfig, "critic_lr=0", "'critic_lr' must be > 0; got 0.0"),
    (GRPOConfig, "overlong_buffer=17", "'overlong_buffer' must be in [0, 16]; got 17"),
    (GRPOConfig, "overlong_penalty=-1 overlong_buffer=4", "'overlong_penalty' must be >= 0; got -1.0"),
    (GRPOConfig, "overlong_buffer=4 process_reward=arithmetic_steps", "overlong_buffer shapes the outcome reward"),
    (GRPOConfig, "max_sampling_rounds=0 dynamic_sampling=true", "'max_sampling_rounds' must be >= 1; got 0"),
    (GRPOConfig, "max_sampling_rounds=8", "max_sampling_rounds=8 is used by dynamic_sampling=true only, which is off"),
    (PPOConfig, "minibatch_size=0", "'minibatch_size' must be >= 1; got 0"),
    (PPOConfig, "kl_coef=-0.1", "'kl_coef' must be >= 0; got -0.1"),
    (PPOConfig, "target_kl=0", "'target_kl' must be > 0"),
    (PPOConfig, "gamma=1.5", "'gamma' must be in [0, 1]; got 1.5"),
    (PPOConfig, "eps_clip=0", "'eps_clip' must be > 0; got 0.0"),
    (PPOConfig, "score_clip=0", "'score_clip' must be > 0; got 0.0"),
    (PPOConfig, "missing_eos_penalty=-1", "'missing_eos_penalty' must be >= 0; got -1.0"),    (SFTConfig, "eval_limit=50", "eval_limit=50 is used by held-out evaluation (eval_data) only, which is off"),
    (SFTConfig, "eval_max_new_tokens=4", "eval_max_new_tokens=4 is used by held-out evaluation (eval_data) only"),
    (RMConfig, "eval_limit=50", "eval_limit=50 is used by held-out evaluation (eval_data) only"),
    (PRMConfig, "eval_limit=50", "eval_limit=50 is used by held-out evaluation (eval_data) only"),
    (DPOConfig, "eval_limit=50", "eval_limit=50 is used by held-out evaluation (eval_data, eval_prompts) only"),
    (DPOConfig, "eval_max_new_tokens=4 eval_data=x.jsonl",
     "eval_max_new_tokens=4 is used by the held-out accuracy (eval_prompts) only"),
    (GRPOConfig, "eval_max_new_tokens=4", "eval_max_new_tokens=4 is used by held-out evaluation (eval_data) only"),
    (PPOConfig, "eval_limit=50", "eval_limit=50 is used by held-out evaluation (eval_data) only"),
    (PPOConfig, "sampling_correction=always", "'sampling_correction' must be one of sequence_mask, sequence_truncate"),
    (PPOConfig, "sampling_correction=none sampling_correction_max=2",
     "sampling_correction_max=2.0 is used by sampling_correction other than none only"),
    (GRPOConfig, "sampling_correction_min=2 sampling_correction_max=2",
     "'sampling_correction_max' must be > sampling_correction_min"),
    (PPOConfig, "sampling_correction=token_truncate sampling_correction_max=null",  # torch.clamp(None, None) mid-run
     "sampling_correction=token_truncate truncates the weights to [sampling_correction_min, sampling_correction_max]; "
     "give at least one bound"),
    (GRPOConfig, "sampling_correction_max=0", "'sampling_correction_max' must be > 0; got 0.0"),
    # without held-out data, how often to evaluate and how to check answers are refused, not unused (TRL refuses
    # eval_strategy=steps without an eval_dataset)
    (SFTConfig, "train.eval_every=5", "train.eval_every=5 is used by held-out evaluation (eval_data) only, which is "
                                      "off; turn it on, or leave it out (train.eval_every=0)"),
    (GRPOConfig, "eval_task=arithmetic", "eval_task=arithmetic is used by held-out evaluation (eval_data) only"),
    (PPOConfig, "train.eval_every=5", "train.eval_every=5 is used by held-out evaluation (eval_data) only"),
    (RMConfig, "train.eval_every=5", "train.eval_every=5 is used by held-out evaluation (eval_data) only"),
    (PRMConfig, "train.eval_every=5", "train.eval_every=5 is used by held-out evaluation (eval_data) only"),
    (DPOConfig, "train.eval_every=5", "train.eval_every=5 is used by held-out evaluation (eval_data, eval_prompts)"),
    (DPOConfig, "eval_task=reference eval_data=x.jsonl",
     "eval_task=reference is used by the held-out accuracy (eval_prompts) only"),
    (KTOConfig, "eval_task=reference", "eval_task=reference is used by the held-out accuracy (eval_prompts) only"),
    (DistillConfig, "train.eval_every=5 teacher=t", "train.eval_every=5 is used by held-out evaluation (eval_data)"),
])
def test_nonsense_values_fail_in_one_line_when_read(cls, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, override.split())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_yaml_file_that_does_not_parse_is_one_line_with_its_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntrain:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4:1: not valid YAML") as e:
        load_config(SFTConfig, bad)
    assert "\n" not in str(e.value)


def test_a_micro_batch_that_does_not_divide_the_batch_fails_before_any_model_loads(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'train.micro_batch_size': the per-rank batch 8 must be a multiple"):
        RUNS["sft"](method_config("sft", tiny, tmp_path / "m", 2, micro_batch_size=3))
    assert not (tmp_path / "m").exists()


def test_nan_metrics_are_written_as_json_null(tmp_path):
    MetricsLogger(tmp_path, report_to="none").log(1, {"loss": float("nan"), "kl": torch.tensor(float("inf")), "x": 1.0})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    record = json.loads(line)
    assert record["train/loss"] is None and record["train/kl"] is None and record["train/x"] == 1.0
    assert not math.isnan(record["step"])


# --- 9. wrong models ---------------------------------------------------------------------------

def test_ppo_refuses_a_causal_lm_as_its_reward_model(tiny, tmp_path):
    cfg = replace(method_config("ppo", tiny, tmp_path / "p", 1), reward_model=str(tiny["base"]))
    with pytest.raises(ModelLoadError, match=r"reward_model: .*base is not a reward model \(LlamaForCausalLM\)"):
        run_ppo(cfg)  # before: trained against a randomly initialised score head


def test_a_reward_model_folder_is_refused_as_a_policy(tiny, tmp_path):
    cfg = replace(method_config("sft", tiny, tmp_path / "s", 1), model=reward_folder(tiny))
    with pytest.raises(ModelLoadError, match=r"is a reward or value model \(LlamaForSequenceClassification\), "
                                             r"not a causal LM"):
        run_sft(cfg)


@pytest.mark.parametrize("damage, message", [
    ("tokenizer only", "is not a model folder: it has no config.json"),
    ("truncated weights", "cannot load the model in .*: "),
    ("broken config", r"config.json: not a readable model config"),
])
def test_a_folder_that_is_not_a_model_is_one_line(damage, message, tiny, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny["base"], folder)
    if damage == "tokenizer only":
        (folder / "config.json").unlink()
        (folder / "model.safetensors").unlink()
    elif damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ModelLoadError, match=message) as e:
        run_sft(replace(method_config("sft", tiny, tmp_path / "s", 1), model=str(folder)))
    assert "\n" not in str(e.value)


def test_a_hub_id_given_as_a_model_says_that_models_load_from_folders(tmp_path, monkeypatch):
    from rlhfkit.models.load import load_causal_lm, load_tokenizer

    monkeypatch.chdir(tmp_path)
    for load in (load_tokenizer, lambda path: load_causal_lm(path, None)):
        with pytest.raises(ModelLoadError, match=r"not found: Qwen/Qwen2-0\.5B \(if Qwen/Qwen2-0\.5B is a Hub id: "
                                                 r"rlhfkit loads a model from a local folder; .* huggingface-cli "
                                                 r"download Qwen/Qwen2-0\.5B --local-dir DIR"):
            load("Qwen/Qwen2-0.5B")
    (tmp_path / "runs").mkdir()
    for path in ("runs/nothing/here", "runs/sft"):  # paths, not ids (runs/ is a folder here): no hint
        with pytest.raises(ModelLoadError, match=f"not found: {path}$"):
            load_tokenizer(path)


def test_a_model_folder_set_aside_by_an_interrupted_save_is_put_back_and_never_taken_for_a_checkpoint(tiny, tmp_path,
                                                                                                   capfd):
    """Killed between publish_folder's two renames, a run leaves ``model.old`` (and a checkpoint
    ``step-N.old``) whole and no ``model``: the next start puts them back."""
    cfg = method_config("sft", tiny, tmp_path / "run", 2)
    run_sft(cfg)
    out = tmp_path / "run"
    (out / "model").rename(out / "model.old")
    last = latest_checkpoint(out)
    last.rename(last.with_name(last.name + ".old"))
    assert latest_checkpoint(out) is None or latest_checkpoint(out).name != last.name + ".old"
    run_sft(replace(cfg, train__resume=True, train__max_steps=3))
    assert "the model folder an interrupted save had set aside, put back" in capfd.readouterr().err
    assert not list(out.glob("*.old")) and not list((out / "checkpoints").glob("*.old"))
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m] == [1, 2, 3]  # resumed from step 2


def test_a_rank_the_checkpoint_did_not_have_keeps_its_own_random_stream(tmp_path):
    """A one-process checkpoint resumed on 2 ranks: rank 1 took rank 0's saved state, so both
    ranks sampled (and dropped out) alike; it keeps the stream it was seeded with."""
    from rlhfkit.train.dist import DistInfo

    torch.manual_seed(5)
    path, modules = _linear_checkpoint(tmp_path, 2)
    rank0_next = torch.rand(3)  # what rank 0 draws first after resuming
    torch.manual_seed(6)  # rank 1's own seed (seed + rank), set before the checkpoint loads
    own_next = torch.rand(3)
    torch.manual_seed(6)
    checkpoint_module.load_checkpoint(path, *modules, DistInfo(rank=1, world_size=2))
    assert torch.equal(torch.rand(3), own_next) and not torch.equal(own_next, rank0_next)
    checkpoint_module.load_checkpoint(path, *modules, DistInfo(rank=0, world_size=2))
    assert torch.equal(torch.rand(3), rank0_next)


@pytest.mark.parametrize("method", ["grpo", "sft"])
def test_resuming_on_another_number_of_ranks_says_a_rollout_run_goes_on_with_other_samples(method, tiny, tmp_path,
                                                                                          capfd):
    cfg = method_config(method, tiny, tmp_path / method, 1, save_every=1)
    RUNS[method](cfg)
    state_file = checkpoint_module.latest_checkpoint(tmp_path / method) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # as 2 ranks wrote it
    capfd.readouterr()
    RUNS[method](replace(cfg, train__max_steps=2, train__resume=True))
    said = "the checkpoint was written by 2 rank(s) and this run has 1" in capfd.readouterr().err
    assert said == (method == "grpo")  # an offline method's steps do not depend on the ranks' random streams
