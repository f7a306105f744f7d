"""TorchScript for the few hot functions that run many small operations per call.

A sampling step on a small model is a few hundred small operations, and so is the training
forward and backward of the decoder layers on the short rows of RLHF batches; calling each from
Python costs more than many of them compute. TorchScript runs a whole function's operations from
C++, with the same kernels and so the same numbers. It is deprecated in PyTorch, so everything
here falls back to running the very same function in Python: where it cannot compile, or where
a switch asks for it, read on every call: ``RLHFKIT_SCRIPTED_DECODE=0`` for the sampler's
functions, ``RLHFKIT_SCRIPTED_LAYERS=0`` for the training node's forward (models/fused.py); the switches
that benchmarks/onoff.py and inprocess.py measure.
"""

from __future__ import annotations

import functools
import os
import warnings

DECODE, LAYERS = "RLHFKIT_SCRIPTED_DECODE", "RLHFKIT_SCRIPTED_LAYERS"


def scripted(function, switch: str = DECODE):
    """``function`` compiled by TorchScript (once per process, on first use), or ``function`` itself
    where the environment variable ``switch`` is 0 or it cannot compile."""
    if os.environ.get(switch, "1") == "0":
        return function
    return _compiled(function)


@functools.lru_cache(maxsize=None)
def _compiled(function):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(function)
        except Exception as err:  # noqa: BLE001 - any failure to compile leaves the same maths in Python
            warnings.warn(f"rlhfkit: {function.__qualname__} runs in Python (TorchScript could not compile it: {err})")
            return function
