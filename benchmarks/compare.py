"""rlhfkit and TRL side by side, interleaved, on the work of ../shared/docs/BENCHMARK.md.

    python benchmarks/compare.py METHOD [METHOD ...] [--rounds 3] [--trl-python PY] [--trl-ppo-python PY]
                                 [--shape reference|30m|120m] [--seq short|long] [--steps N] [--warmup N]

METHOD: sft rm dpo grpo ppo generate, and kto orpo cpo rloo distill online_dpo (outside BENCHMARK.md's
table and its targets: on DPO's and GRPO's work, 32 prompts of one answer each to a teacher, and 16
prompts of two answers each judged by a reward, with TRL's defaults for the method). Each round runs `run.py METHOD` (this environment) and
`trl_METHOD.py` (TRL's environment: --trl-python, default .venv-trl/bin/python, made by
`make trl-env`; PPO needs TRL 1.12, --trl-ppo-python, default .venv-trl112/bin/python), each in a
fresh process, alternating which goes first. DPO runs rlhfkit twice per round: like for like
(`--dpo-reference forward`, the reference forwarded every step as TRL does) and its default
(reference log-probs precomputed once, the one-off cost printed); SFT too: padded rows as TRL's,
and padding-free (`--packing`). `--no-variants`: the like-for-like runs only. `generate` compares with plain
transformers `generate` inside one process (run.py does both). `run.py ceiling` runs before and
after, so that the host can be told apart.

Prints one JSON line per process run and one summary line per method: the median ratio
TRL / rlhfkit of seconds per step, its min and max over the rounds, both libraries' median
s/step, tokens/s and model GFLOP/s (TRL's from the same work per step), and peak RSS, and
``reach``: BENCHMARK.md's target for the method, the s/step it allows (TRL's over the target),
how long rlhfkit's products alone would take at the host's ceiling (its model GFLOP per step over
the fastest rate ``ceiling`` measured), and so how much time the target leaves for everything
else (elementwise work, the optimizer, sampling's small products, Python) against what that
takes now. A negative allowance means that the target cannot be met on this host without doing
fewer products than rlhfkit does. Tables for the README go to stderr.
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
ROOT = HERE.parent


def run_json(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """The last JSON line a benchmark process prints; its stderr's tail if it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, **env} if env else None)
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"')]
    if out.returncode != 0 or not lines:
        tail = "\n".join(out.stderr.splitlines()[-15:])
        raise SystemExit(f"benchmark failed (rc {out.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(lines[-1])


def flags(args) -> list[str]:
    return ["--assets", args.assets, "--shape", args.shape, "--seq", args.seq, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--max-length", str(args.max_length)]


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


# rlhfkit's runs of a method: the like-for-like one first ("rlhfkit"), then any other way it
# can do the same work, each reported beside it with its own ratio to TRL
VARIANTS = {
    "dpo": {"rlhfkit": ["--dpo-reference", "forward"], "rlhfkit_precompute": []},  # the default: precomputed
    "sft": {"rlhfkit": [], "rlhfkit_packing": ["--packing"]},  # padding-free rows (SFTConfig.packing)
}
LABELS = {"rlhfkit_precompute": "dpo, rlhfkit's default (reference log-probs precomputed once)",
          "rlhfkit_packing": "sft, padding-free batches (`packing=true`)"}
# --trl-malloc: TRL run a second time with the glibc settings every rlhfkit process makes for itself
# (models/memory.py keep_freed_memory), so that the allocator's share of the ratio can be told apart
TRL_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


# BENCHMARK.md's targets as ratios TRL / rlhfkit (generate: plain transformers ``generate`` / rlhfkit)
TARGETS = {"sft": 1.5, "rm": 2.5, "dpo": 2.5, "grpo": 2.5, "ppo": 5.0, "generate": 2.5}


def reach(summary: dict, ceiling_gflops: float) -> dict:
    """What the method's target asks of this host, in seconds per step: the time it allows, the
    time rlhfkit's products take at the ceiling (a lower bound: the model GFLOP count leaves the
    attention's products out), and what is left of the allowance for everything else, beside what
    everything else takes now."""
    theirs = summary["hf_generate_sec_per_step" if summary["method"] == "generate" else "trl_sec_per_step"]["median"]
    allowed = theirs / TARGETS[summary["method"]]
    products = summary["rlhfkit_gflop_per_step"] / ceiling_gflops
    return {"target": TARGETS[summary["method"]], "allowed_sec_per_step": round(allowed, 4),
            "products_at_ceiling_sec": round(products, 4), "left_for_the_rest_sec": round(allowed - products, 4),
            "the_rest_now_sec": round(summary["rlhfkit_sec_per_step"]["median"] - products, 4),
            "ceiling_gflops_per_s": ceiling_gflops}


def compare(method: str, args) -> dict:
    ours_cmd = [sys.executable, str(HERE / "run.py"), method, *flags(args)]
    trl_python = args.trl_ppo_python if method == "ppo" else args.trl_python
    theirs_cmd = [trl_python, str(HERE / f"trl_{method}.py"), *flags(args)]
    own = VARIANTS.get(method, {"rlhfkit": []})
    if not getattr(args, "variants", True):
        own = {"rlhfkit": own["rlhfkit"]}
    variants = {name: ours_cmd + extra for name, extra in own.items()}
    if method != "generate":
        variants["trl"] = theirs_cmd
        if getattr(args, "trl_malloc", False):
            variants["trl_malloc"] = theirs_cmd
    results: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            line = run_json(variants[name], args.timeout, TRL_MALLOC if name == "trl_malloc" else None)
            results[name].append(line)
            print(json.dumps({"round": r, "variant": name, **line}), flush=True)
    return summarise(method, results)


def summarise(method: str, results: dict[str, list[dict]]) -> dict:
    ours = results["rlhfkit"]
    s_ours = [x["sec_per_step"] for x in ours]
    out = {"method": method, "summary": True, "rounds": len(ours), "rlhfkit_sec_per_step": spread(s_ours),
           "rlhfkit_tokens_per_s": round(statistics.median(x.get("tokens_per_s", 0) for x in ours), 1),
           "rlhfkit_gflops_per_s": round(statistics.median(x["model_gflops_per_s"] for x in ours), 1),
           "rlhfkit_gflop_per_step": round(statistics.median(x["model_gflops_per_s"] * x["sec_per_step"] for x in ours), 3),
           "rlhfkit_peak_rss_mb": max(x["peak_rss_mb"] for x in ours)}
    if method == "generate":
        out["ratio"] = spread([x["speedup_vs_hf_generate"] for x in ours])
        out["hf_generate_sec_per_step"] = spread([x["hf_generate_sec_per_step"] for x in ours])
        return out
    theirs = results["trl"]
    s_theirs = [x["sec_per_step"] for x in theirs]
    # each round's ratio pairs the two runs of that round
    out["ratio"] = spread([t / o for t, o in zip(s_theirs, s_ours)])
    out["trl_sec_per_step"] = spread(s_theirs)
    scale = statistics.median(s_ours) / statistics.median(s_theirs)  # same work per step
    # TRL forwards every sequence whole: its tokens/s from rlhfkit's count of the plain layout
    plain = statistics.median(x.get("sequence_tokens_per_s", x.get("tokens_per_s", 0)) for x in ours)
    out["trl_tokens_per_s"] = round(plain * scale, 1)
    out["trl_gflops_per_s"] = round(out["rlhfkit_gflops_per_s"] * scale, 1)
    out["trl_peak_rss_mb"] = max(x["peak_rss_mb"] for x in theirs)
    out["trl_version"] = theirs[0]["library"]
    if "trl_malloc" in results:  # TRL under rlhfkit's malloc settings, against the same rlhfkit runs
        times = [x["sec_per_step"] for x in results["trl_malloc"]]
        out["trl_malloc"] = {"sec_per_step": spread(times), "ratio": spread([t / o for t, o in zip(times, s_ours)]),
                             "peak_rss_mb": max(x["peak_rss_mb"] for x in results["trl_malloc"])}
    for name in set(results) - {"rlhfkit", "trl", "trl_malloc"}:
        times = [x["sec_per_step"] for x in results[name]]
        out[name] = {"sec_per_step": spread(times), "ratio": spread([t / o for t, o in zip(s_theirs, times)]),
                     "gflops_per_s": round(statistics.median(x["model_gflops_per_s"] for x in results[name]), 1)}
        if name == "rlhfkit_precompute":  # the one-off pass, also spread over the run's steps (warm-up and timed)
            out[name]["one_off_s"] = round(statistics.median(x["reference_precompute_s"] for x in results[name]), 3)
            with_it = [x["sec_per_step_including_reference"] for x in results[name]]
            out[name]["ratio_with_one_off"] = spread([t / o for t, o in zip(s_theirs, with_it)])
    return out


def table_row(s: dict) -> str:
    if s["method"] == "generate":
        return (f"| generate | {s['rlhfkit_sec_per_step']['median']} | {s['hf_generate_sec_per_step']['median']} (HF) "
                f"| **{s['ratio']['median']}x** ({s['ratio']['min']}-{s['ratio']['max']}) | - | "
                f"{s['rlhfkit_gflops_per_s']} / - | {s['rlhfkit_peak_rss_mb']} / - |")
    row = (f"| {s['method']} | {s['rlhfkit_sec_per_step']['median']} | {s['trl_sec_per_step']['median']} "
           f"| **{s['ratio']['median']}x** ({s['ratio']['min']}-{s['ratio']['max']}) "
           f"| {s['rlhfkit_tokens_per_s']} / {s['trl_tokens_per_s']} | {s['rlhfkit_gflops_per_s']} / "
           f"{s['trl_gflops_per_s']} | {s['rlhfkit_peak_rss_mb']} / {s['trl_peak_rss_mb']} |")
    if "trl_malloc" in s:
        v = s["trl_malloc"]
        row += (f"\n| {s['method']}, TRL with rlhfkit's malloc settings | {s['rlhfkit_sec_per_step']['median']} | "
                f"{v['sec_per_step']['median']} | **{v['ratio']['median']}x** ({v['ratio']['min']}-{v['ratio']['max']}) "
                f"| | | {s['rlhfkit_peak_rss_mb']} / {v['peak_rss_mb']} |")
    for name in sorted(set(s) & set(LABELS)):
        v = s[name]
        one_off = (f"one-off {v['one_off_s']} s; with it spread over the run's steps "
                   f"{v['ratio_with_one_off']['median']}x" if "one_off_s" in v else "")
        row += (f"\n| {LABELS[name]} | {v['sec_per_step']['median']} | {s['trl_sec_per_step']['median']} | "
                f"**{v['ratio']['median']}x** ({v['ratio']['min']}-{v['ratio']['max']}) | | {v['gflops_per_s']} / | {one_off} |")
    return row


def reach_row(s: dict) -> str:
    r = s["reach"]
    ms = {k: round(r[k] * 1e3, 1) for k in ("allowed_sec_per_step", "products_at_ceiling_sec", "left_for_the_rest_sec",
                                             "the_rest_now_sec")}
    return (f"| {s['method']} | {r['target']}x | {ms['allowed_sec_per_step']} | {ms['products_at_ceiling_sec']} "
            f"| {ms['left_for_the_rest_sec']} | {ms['the_rest_now_sec']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", choices=("sft", "rm", "dpo", "grpo", "ppo", "generate", "kto", "orpo",
                                                        "cpo", "rloo", "distill", "online_dpo"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--trl-ppo-python", default=str(ROOT / ".venv-trl112" / "bin" / "python"))
    p.add_argument("--assets", help="asset folder (built once, reused); default .bench/<shape>-<seq>")
    p.add_argument("--shape", default="reference", choices=("reference", "30m", "120m"))
    p.add_argument("--seq", default="short", choices=("short", "long"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, help="default 128, or 320 with --seq long")
    p.add_argument("--trl-malloc", action="store_true",
                   help="also run TRL with the malloc settings rlhfkit's processes make for themselves")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help="only the like-for-like rlhfkit run (no precomputed DPO reference, no padding-free SFT)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark process")
    args = p.parse_args()
    args.assets = args.assets or str(ROOT / ".bench" / f"{args.shape}-{args.seq}")
    args.max_length = args.max_length or (320 if args.seq == "long" else 128)
    ceiling = [run_json([sys.executable, str(HERE / "run.py"), "ceiling"], args.timeout)]
    print(json.dumps(ceiling[0]), flush=True)
    summaries = [compare(m, args) for m in args.methods]
    ceiling.append(run_json([sys.executable, str(HERE / "run.py"), "ceiling"], args.timeout))
    print(json.dumps(ceiling[1]), flush=True)
    fastest = max(c[k] for c in ceiling for k in ("mm_gflops_per_s", "onednn_gflops_per_s") if c.get(k) is not None)
    for s in summaries:
        if s["method"] in TARGETS:  # KTO and RLOO are outside BENCHMARK.md's table: no target
            s["reach"] = reach(s, fastest)
        print(json.dumps(s), flush=True)
    print(f"\n{args.shape} model, {args.seq} sequences, {args.rounds} rounds of {args.steps} timed steps; ceiling "
          f"{ceiling[0]['mm_gflops_per_s']} / {ceiling[1]['mm_gflops_per_s']} GFLOP/s before / after",
          file=sys.stderr)
    print("| method | rlhfkit s/step | TRL s/step | TRL / rlhfkit (min-max) | tokens/s (rlhfkit / TRL) "
          "| model GFLOP/s (rlhfkit / TRL) | peak RSS MB (rlhfkit / TRL) |\n| --- | --- | --- | --- | --- | --- | --- |",
          file=sys.stderr)
    for s in summaries:
        print(table_row(s), file=sys.stderr)
    print(f"\nWhat each target leaves, ms per step (products at the fastest ceiling measured, {fastest} GFLOP/s)\n"
          "| method | target | allowed | rlhfkit's products at the ceiling | left for the rest | the rest now |\n"
          "| --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    for s in filter(lambda s: "reach" in s, summaries):
        print(reach_row(s), file=sys.stderr)


if __name__ == "__main__":
    main()
