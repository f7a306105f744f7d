"""PNG curves of a run's ``metrics.jsonl``, for a person who would rather look than read.

One figure per concern, one panel per metric, one line per run (``plot_runs`` overlays several
runs, ``rlhfkit plot RUN_DIR ...``): the training losses, the reward (GRPO's reward, PPO's
reward-model score, the RM's and DPO's margins), the KL to the reference, distillation's divergence
to its teacher, and every held-out
metric at each eval. A figure whose metrics a run does not log is not written. matplotlib runs
on its headless Agg backend, imported only here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# figure name -> (title, does a metric key belong to it); keys are "train/..." or "eval/...".
FIGURES = {
    "loss": ("training loss", lambda k: k.startswith("train/") and k.endswith("loss")),
    "reward": ("reward", lambda k: k.startswith("train/") and any(
        w in k for w in ("reward_mean", "rm_score", "margin", "pairwise_accuracy", "preference_accuracy", "tied_pairs",
                         "score_gap"))),
    "kl": ("KL to the reference", lambda k: k.startswith("train/") and k.split("/")[1] in ("kl", "kl_coef")),
    "teacher": ("distillation: the divergence to the teacher and the teacher's entropy",
                lambda k: k in ("train/divergence", "train/teacher_entropy")),
    "eval": ("held-out metrics at each eval", lambda k: k.startswith("eval/") and not k.endswith(("/n", "/step", "_s"))),
}


def read_curves(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """metric key -> (steps, values) from ``run_dir/metrics.jsonl`` (numbers only, nulls skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (a run's train.out_dir holds one)")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    unread = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not a metrics record
            unread.append(number)
            continue
        for key, value in record.items():
            if key in ("step", "time_s") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = curves.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    if unread:
        print(f"{path}: line(s) {', '.join(map(str, unread))} are not metrics records (no JSON object with a "
              "step); left out of the plots", file=sys.stderr)
    return curves


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """Write ``out_dir/<figure>.png`` for every figure some run has metrics for; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt

    runs = [read_curves(d) for d in run_dirs]
    labels = labels or _labels(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, belongs) in FIGURES.items():
        keys = sorted({k for curves in runs for k in curves if belongs(k)})
        keys = [k for k in keys if any(len(c.get(k, ((), ()))[0]) for c in runs)]
        if not keys:
            continue
        cols = min(len(keys), 3)
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for i, (curves, label) in enumerate(zip(runs, labels)):
                if key in curves:  # a run keeps its colour in every panel, whichever runs a panel holds
                    steps, values = curves[key]
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label,
                            color=f"C{i % 10}")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        if len(runs) > 1:  # one legend for the figure, naming every run that has a curve in it
            shown = [i for i, curves in enumerate(runs) if any(k in curves for k in keys)]
            handles = [matplotlib.lines.Line2D([], [], color=f"C{i % 10}", marker="o", markersize=3) for i in shown]
            fig.legend(handles, [labels[i] for i in shown], fontsize=7, loc="lower center", ncol=min(len(shown), 4))
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0.06 if len(runs) > 1 else 0, 1, 1))
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _labels(run_dirs) -> list[str]:
    """Run names short enough for a legend: the last path part, with its parent where they clash."""
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):
        names = ["/".join(Path(d).parts[-2:]) for d in run_dirs]
    return names
