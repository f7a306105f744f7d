"""A switch measured on and off inside one process: run.py's steps, alternating the switch.

    python benchmarks/inprocess.py VAR METHOD [--pairs 40] [RUN_PY_FLAGS...]

VAR: an environment switch rlhfkit reads on every call (RLHFKIT_LAYERS_NODE, RLHFKIT_LEAN_FORWARD,
RLHFKIT_SCRIPTED_LAYERS),
or a module constant read on every call with its "on" and "off" values,
``rlhfkit.models.fused:FEW_KEYS=80,0`` (the node's attention as products up to 80 keys, or never;
``None`` for a constant whose None means "timed": ``rlhfkit.models.lean:LAYOUT_MIN_NEW_TOKENS=None,32``).
After run.py's warm-up steps, ``--pairs`` pairs of steps run with VAR=1 and VAR=0 in an order that
alternates pair by pair (on-off, off-on, ...), so that a slow spell of the host falls on both.
Prints one JSON line: the median ms per step on and off and their ratio off / on (above 1: the
switch makes it faster). Where the effect is smaller than the 5-20% between processes, this is
the measurement to read; `onoff.py` gives the between-process one.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402


def switch(var: str):
    """``set(value)`` for value "1" (on) or "0" (off): an environment variable, or a module constant."""
    if ":" not in var:
        return lambda value: os.environ.__setitem__(var, value)
    import importlib

    where, assignment = var.split(":", 1)
    name, values = assignment.split("=", 1)
    module, (on, off) = importlib.import_module(where), values.split(",")
    kind = type(getattr(module, name))
    if kind is bool:  # bool("False") is True
        kind = lambda text: text in ("1", "True", "true")  # noqa: E731
    if getattr(module, name) is None:  # an optional number: None (the module's own rule) or a value
        kind = lambda text: None if text == "None" else json.loads(text)  # noqa: E731
    return lambda value: setattr(module, name, kind(on if value == "1" else off))


def alternating(var: str, pairs: int):
    """A ``timed_steps`` for run.py that alternates ``var`` between steps; prints the A/B line."""
    set_to = switch(var)

    def timed_steps(step_fn, warmup: int, steps: int):
        times: dict[str, list[float]] = {"1": [], "0": []}
        outputs = []
        for i in range(warmup):
            set_to(str(i % 2))
            step_fn(i)
        for k in range(2 * pairs):
            value = "1" if (k + k // 2) % 2 == 0 else "0"
            set_to(value)
            start = time.perf_counter()
            outputs.append(step_fn(warmup + k))
            times[value].append(time.perf_counter() - start)
        on, off = statistics.median(times["1"]), statistics.median(times["0"])
        print(json.dumps({"var": var, "pairs": pairs, "on_ms": round(on * 1e3, 2), "off_ms": round(off * 1e3, 2),
                          "off_over_on": round(off / on, 3)}), file=sys.__stdout__)
        set_to("1")
        return times["1"], outputs[-len(times["1"]):]

    return timed_steps


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    var, method, rest = args[0], args[1], args[2:]
    pairs = 40
    if "--pairs" in rest:
        at = rest.index("--pairs")
        pairs, rest = int(rest[at + 1]), rest[:at] + rest[at + 2:]
    run.timed_steps = alternating(var, pairs)
    sys.argv = ["run.py", method, *rest]
    sys.stdout = sys.stderr  # run.py's own JSON line (the "on" steps only) goes to stderr
    try:
        run.main()
    finally:
        sys.stdout = sys.__stdout__


if __name__ == "__main__":
    main()
