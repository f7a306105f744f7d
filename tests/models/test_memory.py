import resource
import sys

import pytest
import torch

from rlhfkit.models.memory import keep_freed_memory


def _step() -> None:
    held = [torch.empty(2**16 * (1 + i % 12)).fill_(1.0) for i in range(40)]  # 40 tensors of 0.25-3 MB, 15,616 pages
    del held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_steps_freed_tensors_are_reused_without_page_faults():
    # Measured on glibc: ~1,580 faults a step with its default thresholds, ~26 after keep_freed_memory.
    assert keep_freed_memory()
    _step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        _step()
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    assert faults_per_step < 300, faults_per_step


def test_every_run_keeps_freed_memory(monkeypatch):
    # The benchmarks build their Run directly, not through start_run: the setting must come with
    # the Run itself, or a measured step is not the step a user's run takes.
    import rlhfkit.train.run as run_module
    from rlhfkit.train.config import TrainConfig
    from rlhfkit.train.dist import DistInfo

    calls = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: calls.append(1))
    run_module.Run(TrainConfig(), {}, DistInfo(), "bench", "optimizer step")
    assert calls == [1]


_ALLOCATIONS = """
import contextlib, json
import torch
from rlhfkit.models.memory import keep_freed_memory, large_allocations_mapped
def resident_mb():  # anonymous memory only: a fresh install's library pages come in as they are first run
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024
assert keep_freed_memory()
torch.empty(2**17).fill_(1.0)  # 512 KB: the first fill starts the threads (their stacks are resident memory too)
kept = {}
for mapped in (True, True, False, True):  # the last: the threshold is back after the context
    with large_allocations_mapped() if mapped else contextlib.nullcontext():
        before = resident_mb()
        held = torch.empty(2**22).fill_(1.0)  # 16 MB, written
        del held
    kept.setdefault(str(mapped), []).append(resident_mb() - before)
print(json.dumps(kept))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_allocations_mapped_are_given_back_and_the_rest_kept():
    # the sampler's packed weights: pages of their own, given back when freed, while outside the
    # context a freed allocation's memory stays with the process (keep_freed_memory). In a fresh
    # process: where the heap already holds a free chunk that large, glibc serves it from there
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", _ALLOCATIONS], capture_output=True, text=True, timeout=120, check=True)
    kept_mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(kept_mb["True"]) < 2, kept_mb
    assert kept_mb["False"][0] > 15, kept_mb
