"""Helpers the tests share (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from rlhfkit.models.tiny import TinySpec
from rlhfkit.train.config import TrainConfig

# The fixture size STYLE.md asks for: 2 layers, width 64.
SMALL = TinySpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)


def quiet_train(out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), progress=False, report_to="none", plots=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


class Killed(BaseException):
    """A process dying mid-run (not an Exception: nothing in the run may catch it)."""


def run_killed_in_step(monkeypatch, step: int, run) -> None:
    """``run()`` as a process that dies in step ``step``: after its optimizer step(s), before the
    step is logged or checkpointed (the steps before it were, on their cadence)."""
    import pytest

    import rlhfkit.train.run as run_module

    original = run_module.Run.step_done

    def dies(self, *args, **kwargs):
        if self.done == step - 1:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "step_done", dies)
    try:
        with pytest.raises(Killed):
            run()
    finally:
        monkeypatch.setattr(run_module.Run, "step_done", original)
