"""A speed-up measured on and off in one sitting: run.py with a switch variable set to 1 and to 0.

    python benchmarks/onoff.py VAR METHOD [METHOD ...] [--rounds 5] [-- RUN_PY_FLAGS...]

VAR: an environment switch of rlhfkit (RLHFKIT_LEAN_FORWARD, RLHFKIT_FAST_LINEAR,
RLHFKIT_KEEP_FREED_MEMORY, RLHFKIT_SCRIPTED_DECODE, RLHFKIT_SCRIPTED_LAYERS, RLHFKIT_LAYERS_NODE).
Each round runs `run.py METHOD` once with VAR=1 and once with VAR=0,
each in a fresh process, alternating which goes first. Prints each run's JSON line and one summary
line per method: median seconds per step on and off, and the median (min-max) of the rounds'
ratios off / on (above 1: the switch makes it faster), beside the first and last losses of both,
so that a change in the numbers shows too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_line(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"')]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark failed (rc {out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("var")
    p.add_argument("methods", nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    for method in args.methods:
        runs: dict[str, list[dict]] = {"1": [], "0": []}
        for r in range(args.rounds):
            for value in ("1", "0") if r % 2 == 0 else ("0", "1"):
                line = run_line([sys.executable, str(HERE / "run.py"), method, *extra],
                                {**os.environ, args.var: value})
                runs[value].append(line)
                print(json.dumps({"round": r, args.var: value, **line}), flush=True)
        on = [x["sec_per_step"] for x in runs["1"]]
        off = [x["sec_per_step"] for x in runs["0"]]
        ratios = [b / a for a, b in zip(on, off)]
        print(json.dumps({"method": method, "summary": True, "switch": args.var, "rounds": args.rounds,
                          "on_sec_per_step": round(statistics.median(on), 5),
                          "off_sec_per_step": round(statistics.median(off), 5),
                          "speedup": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                      "max": round(max(ratios), 3)},
                          "losses_on": [runs["1"][0].get("first_loss"), runs["1"][0].get("last_loss")],
                          "losses_off": [runs["0"][0].get("first_loss"), runs["0"][0].get("last_loss")]}), flush=True)


if __name__ == "__main__":
    main()
