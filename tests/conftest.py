"""Shared fixtures: the tiny default built once per session, nothing downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

from helpers import SMALL  # noqa: E402

from rlhfkit.models.tiny import write_tiny_default  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{tokenizer, base, data} paths of a width-64 tiny default."""
    return write_tiny_default(tmp_path_factory.mktemp("tiny"), SMALL, seed=0)
