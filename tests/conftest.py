"""Shared fixtures: the tiny default built once per session, nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# oneDNN's products wherever they exist, whatever this host's timing would choose, so that every
# run of the suite takes the same path (the choice itself: tests/models/test_kernels.py)
os.environ.setdefault("RLHFKIT_FAST_LINEAR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

from helpers import SMALL  # noqa: E402

from rlhfkit.models.tiny import write_tiny_default  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{tokenizer, base, data} paths of a width-64 tiny default."""
    return write_tiny_default(tmp_path_factory.mktemp("tiny"), SMALL, seed=0)


@pytest.fixture(scope="session")
def sft_run(tiny, tmp_path_factory):
    """SFT on the tiny default until 0.9 held-out accuracy (or 2000 steps); later stages start here.

    Returns run_sft's summary; ``<out>/model`` is the final model and ``<out>/snapshot`` the first
    one that reached 0.5 (a demonstration-budget model with error left for RL to remove).
    """
    from helpers import quiet_train

    from rlhfkit.methods.sft import SFTConfig, run_sft

    out = tmp_path_factory.mktemp("sft")
    cfg = SFTConfig(model=str(tiny["base"]), train_data=str(tiny["data"] / "sft_train.jsonl"),
                    eval_data=str(tiny["data"] / "sft_eval.jsonl"), max_length=64, eval_limit=300,
                    eval_max_new_tokens=8, stop_at_accuracy=0.9, snapshot_at_accuracy=0.5,
                    train=quiet_train(out, max_steps=2000, batch_size=128, lr=5e-3, warmup_steps=50,
                                      eval_every=100, log_every=10))
    return {**run_sft(cfg), "out": out}


@pytest.fixture(scope="session")
def multistep_sft(tiny, tmp_path_factory):
    """SFT on the multi-step task stopped at 0.5 held-out exact match (the PRM and GRPO-PRM start here)."""
    from helpers import quiet_train

    from rlhfkit.methods.sft import SFTConfig, run_sft

    out = tmp_path_factory.mktemp("sft_multistep")
    data = tiny["data"]
    run_sft(SFTConfig(model=str(tiny["base"]), train_data=str(data / "multistep_sft_train.jsonl"),
                      eval_data=str(data / "multistep_sft_eval.jsonl"), max_length=64, eval_limit=200,
                      eval_max_new_tokens=40, stop_at_accuracy=0.5,
                      train=quiet_train(out, max_steps=3000, batch_size=64, lr=5e-3, warmup_steps=50,
                                        eval_every=100, log_every=50)))
    return out / "model"


@pytest.fixture(scope="session")
def reward_model(tiny, sft_run, tmp_path_factory):
    """The PPO stage's reward model: 3000 steps on the K-way rankings from the final SFT model."""
    from helpers import quiet_train

    from rlhfkit.methods.rm import RMConfig, run_rm

    out = tmp_path_factory.mktemp("rm")
    data = tiny["data"]
    run_rm(RMConfig(model=str(sft_run["out"] / "model"), train_data=str(data / "rankings_train.jsonl"),
                    max_length=64, center_coef=0.0025,
                    train=quiet_train(out, max_steps=3000, batch_size=32, lr=2e-3, warmup_steps=20, log_every=50)))
    return out / "model"


@pytest.fixture
def fresh_choice(monkeypatch):
    """The kernel choice made again under the test's environment, and forgotten after it."""
    from rlhfkit.models import kernels

    def forget():
        for cached in (kernels.linear_kernel, kernels.decode_kernel, kernels.layout_min_new_tokens,
                       kernels.onednn_linear_available):
            cached.cache_clear()
        kernels._PINNED.clear()

    forget()
    yield kernels
    monkeypatch.undo()
    forget()
