"""A torchrun worker dies with its launcher: killed outright (kill -9), torchrun had left both
workers training on, writing the out_dir a run resumed at once would write too."""

import os
import signal
import subprocess
import sys
import time

WORKER = """
import os, sys, time
from rlhfkit.train.dist import init_distributed
info = init_distributed("cpu")
open(os.path.join(sys.argv[1], f"pid{info.rank}"), "w").write(str(os.getpid()))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_torchrun_workers_die_with_a_launcher_killed_outright(tmp_path):
    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    (tmp_path / "w.py").write_text(WORKER)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(tmp_path / "w.py"), str(tmp_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"pid{r}").exists() for r in range(2)) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # both written whole
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        assert all(_alive(p) for p in pids)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 20
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:  # not to leave them running if the test fails
        os.kill(p, signal.SIGKILL)
    assert not left
