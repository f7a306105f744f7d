"""The run skeleton's behaviours, the same in every method: exact resume, the NaN stop,
metrics and the unit of max_steps in the logs."""

import pytest
from methods_setup import METHODS, RUNS, method_config

import rlhfkit.train.run as run_module
from rlhfkit.train.checkpoint import latest_checkpoint
from rlhfkit.train.config import replace
from rlhfkit.train.logging import read_metrics
from rlhfkit.train.optim import NonFiniteError


class Killed(BaseException):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_a_crash_gives_the_uninterrupted_losses(method, tiny, tmp_path, monkeypatch):
    kw = dict(save_every=2, keep_checkpoints=5)
    straight = RUNS[method](method_config(method, tiny, tmp_path / "full", 4, **kw))
    full = [m["train/loss"] for m in read_metrics(tmp_path / "full") if "train/loss" in m]

    original = run_module.Run.step_done

    def dies_in_step_3(self, *args, **kwargs):
        if self.done == 2:
            raise Killed  # as if the process died in step 3, after its optimizer step(s)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", dies_in_step_3)
    with pytest.raises(Killed):
        RUNS[method](method_config(method, tiny, tmp_path / "cut", 4, **kw))
    monkeypatch.setattr(run_module.Run, "step_done", original)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000002"
    cfg = method_config(method, tiny, tmp_path / "cut", 4, **kw)
    summary = RUNS[method](replace(cfg, train__resume=True))
    cut = [m["train/loss"] for m in read_metrics(tmp_path / "cut") if "train/loss" in m]
    assert len(full) == 4 and cut[2:] == full[2:]  # bit for bit: weights, optimizer, data order, RNG
    assert full[3] != full[2]  # the losses move, so equality is not trivial
    assert summary == straight  # the summary too (PPO's KL over the run's last tenth, the last metrics)


@pytest.mark.parametrize("method", METHODS)
def test_a_nan_loss_stops_every_method_before_its_optimizer_step(method, tiny, tmp_path, monkeypatch):
    poisoned = {"on": False}
    original_step = run_module.Run.optimizer_step

    def optimizer_step(self, loss, clip_apart=None):
        return original_step(self, loss * float("nan") if poisoned["on"] else loss, clip_apart)

    original_done = run_module.Run.step_done

    def step_done(self, *args, **kwargs):
        original_done(self, *args, **kwargs)
        poisoned["on"] = True  # every loss after the first step is NaN

    monkeypatch.setattr(run_module.Run, "optimizer_step", optimizer_step)
    monkeypatch.setattr(run_module.Run, "step_done", step_done)
    with pytest.raises(NonFiniteError, match="step 2: the loss is nan"):
        RUNS[method](method_config(method, tiny, tmp_path / "n", 3, save_every=1))
    assert latest_checkpoint(tmp_path / "n").name == "step-0000001"
    assert not (tmp_path / "n" / "model").exists()


@pytest.mark.parametrize("method", METHODS)
def test_logs_name_the_unit_of_max_steps(method, tiny, tmp_path):
    summary = RUNS[method](method_config(method, tiny, tmp_path / "u", 2))
    online = method in ("grpo", "rloo", "ppo", "distill", "online_dpo")
    assert summary["steps_unit"] == ("rollout step" if online else "optimizer step")
    if method == "online_dpo":  # one optimizer step a rollout step, none where every pair tied
        taken = [m["train/update_skipped"] == 0 for m in read_metrics(tmp_path / "u")]
        assert len(taken) == 2 and summary["optimizer_steps"] == sum(taken)
        return
    per_step = {"grpo": 2, "rloo": 2, "ppo": 2}.get(method, 1)  # GRPO, RLOO: mu = 2; PPO: 1 epoch x 8 / 4 minibatches
    assert summary["optimizer_steps"] == 2 * per_step
    logged = [m["train/optimizer_steps"] for m in read_metrics(tmp_path / "u") if "train/loss" in m]
    assert logged == [per_step, 2 * per_step]


def test_resume_auto_starts_afresh_then_continues(tiny, tmp_path):
    cfg = method_config("sft", tiny, tmp_path / "a", 2, save_every=1, log_every=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1}\n')  # killed before its first checkpoint
    RUNS["sft"](replace(cfg, train__resume="auto"))  # no complete checkpoint: a fresh start
    assert [m["step"] for m in read_metrics(tmp_path / "a")] == [1, 2]
    summary = RUNS["sft"](replace(cfg, train__max_steps=3, train__resume="auto"))  # resumes at step 2
    assert summary["steps"] == 3 and [m["step"] for m in read_metrics(tmp_path / "a")] == [1, 2, 3]


def test_a_device_that_is_not_there_fails_before_any_model_loads(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from rlhfkit.train.config import ConfigError

    with pytest.raises(ConfigError, match="train.device=cuda but PyTorch sees no GPU"):
        RUNS["sft"](method_config("sft", tiny, tmp_path / "c", 1, device="cuda"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["sft", "rm", "dpo"])  # GRPO/PPO sample from CUDA's generator
def test_on_a_gpu_the_offline_methods_give_the_cpu_losses(method, tiny, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    RUNS[method](method_config(method, tiny, tmp_path / "cpu", 2, device="cpu", log_every=1))
    RUNS[method](method_config(method, tiny, tmp_path / "gpu", 2, device="cuda", log_every=1))
    cpu = [m["train/loss"] for m in read_metrics(tmp_path / "cpu")]
    gpu = [m["train/loss"] for m in read_metrics(tmp_path / "gpu")]
    assert gpu == pytest.approx(cpu, abs=1e-3)
