"""The long fault loops of issue #17, outside CI: prints one JSON summary.

    python benchmarks/faults.py [--kills 20] [--out DIR] [--methods sft rm dpo grpo ppo dpo_sft_first]

For each method, on the untrained tiny default through the command line (``train.resume=auto``):
a straight run; then the same run interrupted once by SIGTERM (rc, the one-line message, a
complete checkpoint) and ``--kills`` times by ``kill -9`` at random moments, every other one
aimed at a checkpoint write (the kill lands while a ``step-*.tmp`` folder exists), resumed after
each; then run to the end and its final weights compared with the straight run's, its
metrics log checked for one line per step and its folder for debris. Then a full disk: the SFT
run on a 3 MB tmpfs (root only) must stop in one line naming the folder and the cause, leave no
partial folder, and resume elsewhere to the straight run's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["train.log_every=1", "train.progress=false", "train.report_to=none", "train.save_every=2",
          "train.schedule=constant"]


def assets(out: Path) -> dict:
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import load_reward_model
    from rlhfkit.models.tiny import write_tiny_default

    paths = write_tiny_default(out / "tiny", overwrite=True)  # a rerun in the same --out writes them alike
    for name in ("sft_train", "rankings_train", "prefs_train", "prompts_train"):
        lines = (paths["data"] / f"{name}.jsonl").read_text().splitlines()[:64]
        (paths["data"] / f"small_{name}.jsonl").write_text("\n".join(lines) + "\n")
    reward = out / "tiny" / "reward"
    tokenizer = load_tokenizer(paths["base"])
    load_reward_model(paths["base"], tokenizer).save_pretrained(str(reward))
    tokenizer.save_pretrained(str(reward))
    return {**paths, "reward": reward}


def method_args(method: str, a: dict) -> list[str]:
    data, base = a["data"], a["base"]
    # Long enough for 20 kills: each resumed attempt runs at least one step before it is killed
    # (the 2026-12-02 run used 60 and 30 steps: DPO and GRPO reached their end after 19 and 15).
    offline = ["max_length=64", "train.lr=1e-3", "train.max_steps=100"]
    online = ["train.lr=1e-4", "train.max_steps=60", "max_new_tokens=6"]
    return {
        "sft": ["sft", f"model={base}", f"train_data={data / 'small_sft_train.jsonl'}", "train.batch_size=8", *offline],
        "rm": ["rm", f"model={base}", f"train_data={data / 'small_rankings_train.jsonl'}", "train.batch_size=4",
               *offline],
        "dpo": ["dpo", f"model={base}", f"train_data={data / 'small_prefs_train.jsonl'}", "train.batch_size=8",
                "beta=0.5", *offline],
        "dpo_sft_first": ["dpo", f"model={base}", f"train_data={data / 'small_prefs_train.jsonl'}",
                          "train.batch_size=8", "beta=0.5", "sft_first_steps=30", "reference=forward", *offline],
        "grpo": ["grpo", f"model={base}", f"train_data={data / 'small_prompts_train.jsonl'}", "group_size=4",
                 "prompts_per_step=4", "rewards=contains_answer", "mu=2", *online],
        "ppo": ["ppo", f"model={base}", f"reward_model={a['reward']}", f"critic={base}",
                f"train_data={data / 'small_prompts_train.jsonl'}", "prompts_per_step=8", "minibatch_size=4",
                "ppo_epochs=1", *online],
    }[method]


def cli(args: list[str], out: Path, *extra: str):
    cmd = [sys.executable, "-m", "rlhfkit.cli.main", *args, *COMMON, f"train.out_dir={out}", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc, timeout=900) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def tmp_folders(out: Path) -> list[Path]:
    return [p for p in out.rglob("step-*.tmp*")]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def wait_for_progress(proc, out: Path, before: int, limit: float = 300) -> bool:
    """Until a new line is logged (True), or the process ends (False)."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if logged_steps(out) > before:
            return True
        time.sleep(0.01)
    return False


def kill_inside_a_save(proc, out: Path, limit: float = 5.0) -> bool:
    """SIGKILL as soon as a temporary checkpoint folder exists; True if it did when killed."""
    root, deadline = out / "checkpoints", time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(".tmp" in name for name in os.listdir(root)):
                proc.kill()
                return True
        except FileNotFoundError:
            pass
    proc.kill()
    return False


def final_weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def compare(a: dict, b: dict) -> tuple[bool, float]:
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys(), diff


def sigterm_once(args, out: Path) -> dict:
    proc = cli(args, out, "train.resume=auto")
    wait_for_progress(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    rc, err = finished(proc)
    lines = [x for x in err.splitlines() if x.startswith("rlhfkit ")]
    from rlhfkit.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    return {"rc": rc, "message": lines[-1] if lines else None, "traceback": "Traceback" in err,
            "complete_checkpoint": bool(ckpt and (ckpt / "COMPLETE").is_file()),
            "ok": rc == 143 and bool(lines) and "train.resume=true" in lines[-1] and "Traceback" not in err}


def fault_loop(method: str, a: dict, work: Path, kills: int, rng: random.Random) -> dict:
    args = method_args(method, a)
    straight = work / f"{method}-straight"
    rc, err = finished(cli(args, straight))
    assert rc == 0, err[-2000:]
    out = work / f"{method}-faults"
    result = {"sigterm": sigterm_once(args, out)}
    done = aimed_at_save = in_save = failures = 0
    while done < kills:
        before = logged_steps(out)
        proc = cli(args, out, "train.resume=auto")
        if not wait_for_progress(proc, out, before):
            rc, err = finished(proc)
            if rc != 0:
                failures += 1
                result.setdefault("errors", []).append(err.strip().splitlines()[-1:])
            break  # it ran to the end before the next kill (then kills < --kills: lengthen the run)
        if done % 2:
            aimed_at_save += 1
            in_save += kill_inside_a_save(proc, out)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
            in_save += bool(tmp_folders(out))
        proc.wait()
        done += 1
    rc, err = finished(cli(args, out, "train.resume=auto"))
    equal, diff = compare(final_weights(out), final_weights(straight)) if rc == 0 else (False, float("nan"))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    straight_steps = [json.loads(x)["step"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    result.update(kills=done, kills_aimed_at_checkpoint_writes=aimed_at_save, kills_inside_checkpoint_writes=in_save,
                  failed_resumes=failures + (rc != 0), final_rc=rc, final_weights_equal=equal, max_abs_diff=diff,
                  metrics_lines_match=steps == straight_steps, debris=[str(p) for p in tmp_folders(out)])
    result["ok"] = (equal and rc == 0 and not failures and done >= kills and steps == straight_steps
                    and not result["debris"] and result["sigterm"]["ok"])
    return result


def full_disk(a: dict, work: Path) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    args = method_args("sft", a)
    try:
        rc, err = finished(cli(args, disk / "run", "train.keep_checkpoints=0"))
        lines = [x for x in err.splitlines() if x.startswith("rlhfkit ")]
        debris = [str(p) for p in tmp_folders(disk / "run")]
        moved = work / "disk-resumed"
        shutil.copytree(disk / "run", moved)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
    rc2, err2 = finished(cli(args, moved, "train.keep_checkpoints=0", "train.resume=true"))
    equal, diff = compare(final_weights(moved), final_weights(work / "sft-straight")) if rc2 == 0 else (False, None)
    return {"rc": rc, "message": lines[-1] if lines else None, "traceback": "Traceback" in err, "debris": debris,
            "resumed_elsewhere_rc": rc2, "final_weights_equal": equal, "max_abs_diff": diff,
            "ok": rc == 2 and bool(lines) and "no space left on device" in lines[-1].lower() and not debris
            and "Traceback" not in err and equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=["sft", "rm", "dpo", "dpo_sft_first", "grpo", "ppo"])
    parser.add_argument("--out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="rlhfkit-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start, rng = time.time(), random.Random(args.seed)
    a = assets(work)
    summary = {"kills_per_method": args.kills, "methods": {}}
    for method in args.methods:
        t0 = time.time()
        summary["methods"][method] = {**fault_loop(method, a, work, args.kills, rng), "seconds": round(time.time() - t0)}
        print(json.dumps({method: summary["methods"][method]}), file=sys.stderr)
    if "sft" in args.methods:
        summary["full_disk"] = full_disk(a, work)
    summary["all_ok"] = all(m["ok"] for m in summary["methods"].values()) and summary.get("full_disk", {}).get("ok", True)
    summary["seconds"] = round(time.time() - start)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
