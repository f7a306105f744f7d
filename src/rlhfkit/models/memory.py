"""Keep freed tensor memory in the process (glibc malloc settings) so steps do not page-fault.

A training step on a CPU allocates and frees the same activation and gradient tensors, a few
MB each, every step. glibc serves allocations above its mmap threshold with fresh pages from
the kernel and returns memory freed at the top of its heap to the kernel, so each step faults
its activations in again: about 3,700 minor page faults per SFT step of the tiny default,
about a sixth of the step's CPU time. Raising both thresholds (what the environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do, or an allocator like jemalloc)
keeps that memory for the next step: about 380 faults, the step 15-20% faster. The cost is
that the process keeps its peak heap instead of shrinking between steps.
Every ``Run`` applies it when it is made (train/run.py), a benchmark's included. It lives
among the models because the sampler's decoder (models/lean.py) maps its short-lived packed
weights around it (``large_allocations_mapped``).
``RLHFKIT_KEEP_FREED_MEMORY=0`` leaves malloc as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2**30


@functools.lru_cache(maxsize=None)
def _mallopt():
    """glibc's ``mallopt``, or None where there is none (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds high, once per process; whether it applied."""
    mallopt = _mallopt()
    if os.environ.get("RLHFKIT_KEEP_FREED_MEMORY", "1") == "0" or mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = 4 * 2**20):
    """Inside: allocations of at least ``threshold`` bytes get pages of their own from the kernel,
    which it takes back when they are freed, where ``keep_freed_memory`` had made glibc keep them.

    For short-lived buffers that would otherwise leave holes in the kept heap: the sampler's
    MKL-packed weights (models/lean.py), for which MKL asks 7-12 MB a matrix and writes about
    the matrix's own size. From glibc's heap, GRPO's peak RSS grew by 65-73 MB over its first
    dozen steps with the reference model's 17 packs; mapped, by 16-20 MB, the pages each call
    writes being faulted in again (about 1.5 ms a GRPO step). Elsewhere (nothing kept) a no-op.
    """
    kept = keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()  # applied earlier: never here
    if kept:
        _mallopt()(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if kept:
            _mallopt()(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
