"""TorchScript for the few hot functions called once per sampled token.

A sampling step on a small model is a few hundred small operations, and calling each from Python
costs more than many of them compute. TorchScript runs a whole function's operations from C++,
with the same kernels and so the same numbers. It is deprecated in PyTorch, so everything here
falls back to running the very same function in Python: where it cannot compile, or where
``RLHFKIT_SCRIPTED_DECODE=0`` asks for it (the switch that benchmarks/onoff.py measures).
"""

from __future__ import annotations

import functools
import os
import warnings


@functools.lru_cache(maxsize=None)
def scripted(function):
    """``function`` compiled by TorchScript (once per process, on first use), or ``function`` itself."""
    if os.environ.get("RLHFKIT_SCRIPTED_DECODE", "1") == "0":
        return function
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(function)
        except Exception as err:  # noqa: BLE001 - any failure to compile leaves the same maths in Python
            warnings.warn(f"rlhfkit: {function.__qualname__} runs in Python (TorchScript could not compile it: {err})")
            return function
