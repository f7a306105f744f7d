"""Preemption and user errors at the command line (issue #17): SIGTERM and SIGINT finish the step,
write a complete checkpoint and exit in one line; a second signal exits at once; resuming gives
the uninterrupted run's weights; a user error prints one line and no traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from methods_setup import small
from safetensors.torch import load_file

from rlhfkit.train.checkpoint import latest_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _args(tiny, out, *extra):
    return [sys.executable, "-m", "rlhfkit.cli.main", "sft", f"model={tiny['base']}",
            f"train_data={small(tiny, 'sft_train.jsonl')}", "max_length=64", "train.max_steps=30",
            "train.batch_size=8", "train.lr=1e-3", "train.progress=false", "train.report_to=none",
            "train.log_every=1", f"train.out_dir={out}", *extra]


def _signalled(tiny, out, signums, *extra) -> subprocess.CompletedProcess:
    """Run the CLI, send ``signums`` (back to back) once the first step is logged."""
    proc = subprocess.Popen(_args(tiny, out, *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.02)
    for signum in signums:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _model(folder):
    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(_args(tiny, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return _model(out)


def test_sigterm_finishes_the_step_checkpoints_and_resuming_gives_the_straight_weights(tiny, tmp_path, straight):
    signum, out = signal.SIGTERM, tmp_path / "run"
    stopped = _signalled(tiny, out, [signum])
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and (checkpoint / "COMPLETE").is_file()
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < 30
    assert last == (f"rlhfkit sft: stopped by {signal.Signals(signum).name} after optimizer step {step} of 30; "
                    f"checkpoint {checkpoint} is complete: rerun with train.resume=true to continue")
    resumed = subprocess.run(_args(tiny, out, "train.resume=true"), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    weights = _model(out)
    assert all(torch.equal(weights[k], straight[k]) for k in straight)


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    from methods_setup import RUNS, method_config

    import rlhfkit.train.run as run_module
    from rlhfkit.train.config import replace
    from rlhfkit.train.logging import read_metrics

    RUNS["sft"](method_config("sft", tiny, tmp_path / "full", 5))
    original = run_module.Run.step_done

    def interrupted(self, *args, **kwargs):
        if self.done == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2 (no KeyboardInterrupt, no traceback)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", interrupted)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN under a shell's `cmd &`
    with pytest.raises(run_module.Preempted, match="stopped by SIGINT after optimizer step 2 of 5; checkpoint "
                                                   ".*step-0000002 is complete: rerun with train.resume=true") as e:
        RUNS["sft"](method_config("sft", tiny, tmp_path / "cut", 5))
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # given back
    monkeypatch.setattr(run_module.Run, "step_done", original)
    RUNS["sft"](replace(method_config("sft", tiny, tmp_path / "cut", 5), train__resume=True))
    assert [m["train/loss"] for m in read_metrics(tmp_path / "cut")] == \
        [m["train/loss"] for m in read_metrics(tmp_path / "full")]


def test_a_second_signal_exits_at_once_naming_the_checkpoint_kept(monkeypatch, capfd, tmp_path):
    import rlhfkit.train.run as run_module
    from rlhfkit.train.checkpoint import MARKER
    from rlhfkit.train.config import TrainConfig

    exits = []
    monkeypatch.setattr(run_module.os, "_exit", exits.append)
    kept = tmp_path / "checkpoints" / "step-0000003"
    kept.mkdir(parents=True)
    (kept / MARKER).write_text("ok\n")
    run = run_module.Run(TrainConfig(out_dir=str(tmp_path)), {}, run_module.DistInfo(), "sft", "optimizer step")
    run._on_signal(signal.SIGTERM, None)
    assert run.signal == signal.SIGTERM and exits == []  # the first one waits for the step to end
    run._on_signal(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]
    assert f"SIGTERM again: exiting now; the last complete checkpoint is kept: {kept}" in capfd.readouterr().err


_FINISHING = """
import os, signal, sys
import rlhfkit.train.run as run_module
from rlhfkit.methods.sft import SFTConfig, run_sft
from rlhfkit.train.config import TrainConfig

plot = run_module.plot_runs
def signalled_plot(*args, **kwargs):  # SIGTERM while the final folder is written, before its plots
    os.kill(os.getpid(), signal.SIGTERM)
    return plot(*args, **kwargs)
run_module.plot_runs = signalled_plot
model, data, out = sys.argv[1:4]
run_sft(SFTConfig(model=model, train_data=data, max_length=64,
                  train=TrainConfig(out_dir=out, max_steps=2, batch_size=8, progress=False, report_to="none")))
print("handler given back:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""


def test_a_signal_while_the_final_folder_is_written_lets_it_complete(tiny, tmp_path):
    # the steps are done: the model, result.json and plots (seconds) are written first, the run ends complete
    # (before: the process ended at the signal, with no word and no plots)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _FINISHING, str(tiny["base"]), small(tiny, "sft_train.jsonl"), str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"SIGTERM was received: the final model folder {out / 'model'} was written first, and the run is " \
        "complete" in done.stderr
    assert (out / "result.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert any((out / "plots").glob("*.png")) and "handler given back: True" in done.stdout


def test_user_errors_print_one_line_and_no_traceback(tiny, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [x,\n")
    for args in (["sft", "--config", bad],):
        out = subprocess.run([sys.executable, "-m", "rlhfkit.cli.main", *map(str, args)], env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        (line,) = [x for x in out.stderr.splitlines() if x.startswith("rlhfkit sft: error:")]
        assert "bad.yaml:2:1: not valid YAML" in line, line
