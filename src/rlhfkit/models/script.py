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

# Per switch, whether TorchScript's profiling executor optimises the compiled functions (read on
# every call); else its plain executor runs them. On a CPU it fuses nothing here, and neither is
# faster (in one process: SFT 1.007x, GRPO 0.996x, whole sampling calls 1.00x), but their memory
# differs. With the sampler's whole token loop compiled (rollout/sampler.py), GRPO on ~256-token
# rows levelled off at 893 MB optimised against 839-845 plain, over 40 steps. For the training node's
# forward (models/fused.py) no difference showed (SFT on those rows: 889-921 MB optimised, 891-948
# plain, three runs each), so it stays as it was.
OPTIMIZED = {DECODE: False, LAYERS: True}


def scripted(function, switch: str = DECODE):
    """``function`` compiled by TorchScript (once per process, on first use), or ``function`` itself
    where the environment variable ``switch`` is 0 or it cannot compile."""
    if os.environ.get(switch, "1") == "0":
        return function
    return _compiled(function, switch)


class Compiled:
    """A TorchScript function, run by the executor ``OPTIMIZED[switch]`` names."""

    def __init__(self, script, switch: str):
        self.script, self.switch = script, switch

    def __call__(self, *args):
        import torch

        with torch.jit.optimized_execution(OPTIMIZED[self.switch]):
            return self.script(*args)


@functools.lru_cache(maxsize=None)
def _compiled(function, switch: str):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return Compiled(torch.jit.script(function), switch)
        except Exception as err:  # noqa: BLE001 - any failure to compile leaves the same maths in Python
            warnings.warn(f"rlhfkit: {function.__qualname__} runs in Python (TorchScript could not compile it: {err})")
            return function
