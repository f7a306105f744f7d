"""Helpers the tests share (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from rlhfkit.models.tiny import TinySpec
from rlhfkit.train.config import TrainConfig

# The fixture size STYLE.md asks for: 2 layers, width 64.
SMALL = TinySpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)


def quiet_train(out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), progress=False, report_to="none", plots=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)
