"""Atomic, resumable checkpoints.

A checkpoint is a folder ``step-000010`` holding the model weights (safetensors), optimizer
and scheduler state, every RNG state, the trainer state (step, data position, extras) and the
resolved config. It is written into a temporary folder, the ``COMPLETE`` marker is written
last, and only then is the folder renamed into place; resume only ever picks a folder with
the marker, and old checkpoints are removed only after the new one is complete. Everything is
read back with ``weights_only=True``: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first; partial ones (no marker) are ignored."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).is_file() and ".tmp" not in p.name]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, scheduler, config: dict,
                    extra: dict | None = None, keep: int = 2) -> Path:
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _fsync_dir(tmp)
    (tmp / MARKER).write_text("ok\n")
    if final.exists():  # a complete checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from a complete checkpoint; returns trainer state."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(model)]:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def _tied_keys(model) -> set[str]:
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
