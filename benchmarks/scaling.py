"""How cost grows: rlhfkit and TRL side by side at three model sizes and two sequence lengths.

    python benchmarks/scaling.py [--methods sft dpo grpo] [--shapes reference 30m 120m] [--seqs short long]
                                 [--rounds 1] [--steps 3] [--warmup 1] [--out FILE.jsonl]

Each (shape, seq) runs `compare.py`'s interleaved comparison (BENCHMARK.md's scaling shapes: the
same Qwen2 family, untied, vocab 1024, at hidden 256/4 layers, 512/8, 1024/8; ~13 and ~256 tokens
per sequence). `run.py ceiling` runs before and after. Prints one JSON line per configuration
and a table for the README on stderr:
s/step, tokens/s and model GFLOP/s for both, and the ratio TRL / rlhfkit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import compare

PARAMS = {"reference": "4.7M", "30m": "30M", "120m": "119M"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["sft", "dpo", "grpo"])
    p.add_argument("--shapes", nargs="+", default=["reference", "30m", "120m"])
    p.add_argument("--seqs", nargs="+", default=["short", "long"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--trl-python", default=str(compare.ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="append the summary lines to this JSONL file")
    args = p.parse_args()
    args.trl_ppo_python, args.variants = None, False  # like for like only
    rows = []
    ceiling = [compare.run_json([sys.executable, str(compare.HERE / "run.py"), "ceiling"], args.timeout)]
    print(json.dumps(ceiling[0]), flush=True)
    for shape in args.shapes:
        for seq in args.seqs:
            args.shape, args.seq = shape, seq
            args.assets = str(compare.ROOT / ".bench" / f"{shape}-{seq}")
            args.max_length = 320 if seq == "long" else 128
            for method in args.methods:
                summary = {**compare.compare(method, args), "shape": shape, "seq": seq}
                print(json.dumps(summary), flush=True)
                if args.out:
                    with Path(args.out).open("a") as f:
                        f.write(json.dumps(summary) + "\n")
                rows.append(summary)
    ceiling.append(compare.run_json([sys.executable, str(compare.HERE / "run.py"), "ceiling"], args.timeout))
    print(json.dumps(ceiling[1]), flush=True)
    print(f"ceiling before / after: torch.mm {ceiling[0]['mm_gflops_per_s']} / {ceiling[1]['mm_gflops_per_s']}, oneDNN "
          f"{ceiling[0]['onednn_gflops_per_s']} / {ceiling[1]['onednn_gflops_per_s']} GFLOP/s", file=sys.stderr)
    print("| method | model | tokens/seq | rlhfkit s/step | TRL s/step | TRL / rlhfkit | tokens/s (rlhfkit / TRL) "
          "| model GFLOP/s (rlhfkit / TRL) |\n| --- | --- | --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    for s in rows:
        print(f"| {s['method']} | {PARAMS[s['shape']]} | {s['seq']} "
              f"| {s['rlhfkit_sec_per_step']['median']} | {s['trl_sec_per_step']['median']} | **{s['ratio']['median']}x** "
              f"| {s['rlhfkit_tokens_per_s']} / {s['trl_tokens_per_s']} | {s['rlhfkit_gflops_per_s']} / "
              f"{s['trl_gflops_per_s']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
