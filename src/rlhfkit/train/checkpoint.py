"""Atomic, resumable checkpoints.

A checkpoint is a folder ``step-000010`` holding the model weights (safetensors), optimizer
and scheduler state, every RNG state, the trainer state (step, data position, extras) and the
resolved config. It is written into a temporary folder, the ``COMPLETE`` marker is written
last, and only then is the folder renamed into place; resume only ever picks a folder with
the marker, and old checkpoints are removed only after the new one is complete. A checkpoint
written for an eval off the save cadence (see ``Run.step_done``) is marked ``TRANSIENT``: it is not
counted against ``keep`` and goes once a later checkpoint is complete. The plain
format is read back with ``weights_only=True`` (no arbitrary unpickling); a sharded (DCP)
checkpoint's metadata is a pickle that torch.distributed.checkpoint reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_file, save_model

from ..models.load import is_sharded
from .dist import DistInfo, any_rank
from .optim import matching_groups

MARKER = "COMPLETE"
TRANSIENT = "TRANSIENT"


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first; partial ones (no marker) are ignored."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).is_file() and "." not in p.name]  # not .tmp, .old
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, scheduler, config: dict,
                    extra: dict | None = None, keep: int = 2, info: DistInfo | None = None,
                    sharded: bool = False, transient: bool = False, kept: dict | None = None) -> Path:
    """Every rank calls this. Rank 0 prepares the temporary folder; every rank writes its RNG
    state (and, ``sharded``, its shards of the model and optimizer via torch.distributed.checkpoint);
    then rank 0 writes the rest, the ``COMPLETE`` marker last, and renames. Then the checkpoints
    past ``keep`` go, the ``transient`` ones (kept only until a later one) not counted.

    ``kept``: untrained modules whose weights change as the run goes (TR-DPO's reference), by
    name: each beside the model, as ``<name>.safetensors`` or in the sharded ``dcp/`` folder.

    A write that fails on any rank (a full disk, no permission) fails on every rank alike: the
    partial folder is removed, the last complete checkpoint is kept, and a one-line
    CheckpointError names the folder and the cause."""
    info = info or DistInfo()
    root = checkpoint_dir(out_dir)
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    previous = latest_checkpoint(out_dir)

    def prepare():
        new = not root.is_dir()
        root.mkdir(parents=True, exist_ok=True)
        if new:
            _fsync_folder(root.parent)  # the checkpoints/ folder's own name on disk
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def rank_parts():
        torch.save(rng_state(), tmp / f"rng-{info.rank}.pt")
        mine = [tmp / f"rng-{info.rank}.pt"]
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                      **{f"kept.{name}": get_model_state_dict(module) for name, module in (kept or {}).items()}},
                     checkpoint_id=str(tmp / "dcp"), no_dist=not info.enabled)
            mine += sorted((tmp / "dcp").glob(f"__{info.rank}_*"))
        _fsync_files(mine)  # each rank its own files (another node's writes are its to flush), before rank 0's marker

    def main_parts():
        if not sharded:
            _save_weights(model, tmp / "model.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            for name, module in (kept or {}).items():
                save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": info.world_size,
                                                            **(extra or {})}, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if transient:
            (tmp / TRANSIENT).write_text("written for an eval; removed once a later checkpoint is complete\n")
        _fsync_dir(tmp)  # every file and the folder's entries on disk before the marker says complete
        (tmp / MARKER).write_text("ok\n")
        _fsync_dir(tmp, only=MARKER)
        # over a complete checkpoint of the same step from an earlier attempt; the rename on disk
        # before rotation removes any older checkpoint
        publish_folder(tmp, final, synced=True)

    cause = _on_ranks(((prepare, False), (rank_parts, True), (main_parts, False)), root, info)
    if cause is not None:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        left = f"the last complete checkpoint {previous} is kept" if previous else "no earlier checkpoint"
        raise CheckpointError(f"cannot write checkpoint {final}: {cause}; the partial folder was removed, {left}")
    if info.is_main:
        done = complete_checkpoints(out_dir)
        lasting = [p for p in done if not (p / TRANSIENT).is_file()]
        for old in [p for p in done if p != final and (p / TRANSIENT).is_file()] + (lasting[:-keep] if keep > 0 else []):
            shutil.rmtree(old, ignore_errors=True)
    return final


def amend_checkpoint(path: Path, extra: dict, info: DistInfo | None = None) -> Path:
    """Complete a checkpoint written before its step's eval, once the eval has run: every rank
    writes its RNG state as ``after-eval-rng-{rank}.pt``, then rank 0 replaces ``trainer_state.json``
    by one updated with ``extra`` and ``rng_after_eval`` (how many ranks wrote theirs), written
    beside and renamed over. That rename is the one commit point: until it, the checkpoint is the
    one written before the eval, read with its own RNG states, and an amend that fails on any rank
    leaves it so (a one-line CheckpointError; a resumed run runs the eval again)."""
    info = info or DistInfo()

    def replace_with(target: Path, write) -> None:
        tmp = target.with_name(target.name + ".tmp")
        try:
            write(tmp)
            _fsync_files([tmp])
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def rank_parts():
        replace_with(path / f"after-eval-rng-{info.rank}.pt", lambda f: torch.save(rng_state(), f))

    def main_parts():
        state = {**json.loads((path / "trainer_state.json").read_text()), **extra, "rng_after_eval": info.world_size}
        _fsync_folder(path)  # every rank's RNG file is in place before the commit
        replace_with(path / "trainer_state.json", lambda f: f.write_text(json.dumps(state, indent=1)))
        _fsync_folder(path)

    cause = _on_ranks(((rank_parts, True), (main_parts, False)), path, info)
    if cause is not None:
        raise CheckpointError(f"cannot complete checkpoint {path} after its eval: {cause}; it stays as written "
                              "before the eval, which a resumed run runs again")
    return path


def _on_ranks(parts, folder: Path, info: DistInfo) -> str | None:
    """Run each (part, on every rank or rank 0 only) in turn; after the first that fails on any rank,
    the cause (this rank's, or that another rank failed), else None. Every rank gets the same answer."""
    for part, everyone in parts:
        failure = _attempt(part) if everyone or info.is_main else None
        if any_rank(failure is not None, info):  # also the barrier between parts
            return _cause(failure, folder) if failure is not None else "it failed on another rank"
    return None


def _attempt(part) -> Exception | None:
    try:
        part()
    except Exception as e:  # a full disk shows as OSError, or as torch's RuntimeError from its writer
        e.__traceback__ = None  # its frames hold the half-written files open
        return e
    return None


def write_failure(error: Exception, folder: Path) -> str:
    """What went wrong with a write, in a few words: the OS's reason, or no space left."""
    return _cause(error, folder)


def _cause(error: Exception, folder: Path) -> str:
    if isinstance(error, OSError) and error.errno:
        return f"{os.strerror(error.errno)} ({type(error).__name__})"
    try:  # torch's writer reports a full disk as "[enforce fail at inline_container.cc:...]"
        free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on device ({free} bytes free; {type(error).__name__})"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_checkpoint(path: Path, model, optimizer, scheduler, info: DistInfo | None = None,
                    kept: dict | None = None) -> dict:
    """Restore weights, optimizer, scheduler, this rank's RNG and the ``kept`` modules (as
    ``save_checkpoint`` took them) from a complete checkpoint; returns the trainer state. A sharded
    (DCP) checkpoint loads on any number of ranks."""
    info = info or DistInfo()
    kept = kept or {}
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    if (path / "dcp").is_dir():
        _load_sharded(path / "dcp", model, optimizer, info, kept)
    elif (path / "model.safetensors").is_file():
        absent = [f"{name}.safetensors" for name in kept if not (path / f"{name}.safetensors").is_file()]
        if absent:
            raise CheckpointError(f"{path} lacks {', '.join(absent)}: it was written by a run that did not keep them")
        if is_sharded(model):  # a replicated run's, resumed under FSDP2
            _load_whole_into_shards(path, model, optimizer, kept)
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
            if unexpected or [k for k in missing if k not in _tied_keys(model) and k not in _frozen(model)]:
                raise CheckpointError(f"{path}: weights do not match the model (missing {missing}, "
                                      f"unexpected {unexpected})")
            optimizer.load_state_dict(matching_groups(torch.load(path / "optimizer.pt", weights_only=True), optimizer))
            for name, module in kept.items():
                load_model(module, str(path / f"{name}.safetensors"))
    else:
        raise CheckpointError(f"{path} holds neither model.safetensors nor a dcp/ folder")
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    name, ranks = ("after-eval-rng", state["rng_after_eval"]) if state.get("rng_after_eval") else ("rng", None)
    rng = path / f"{name}-{info.rank}.pt"  # a rank the checkpoint did not have keeps the stream it was seeded
    own = rng.is_file() and (ranks is None or info.rank < ranks)  # (not an older amend's file: amend_checkpoint)
    if own:  # with (seed + rank): taking rank 0's state, it had sampled and dropped out as rank 0 did
        set_rng_state(torch.load(rng, weights_only=True))
    return state


def _load_whole_into_shards(path: Path, model, optimizer, kept: dict) -> None:
    """A checkpoint written without sharding (whole weights, an optimizer state keyed by parameter
    index) into a sharded model and its optimizer: every rank reads the whole files and keeps its
    shards. The optimizer was built as the saved one was (``build_optimizer``: the same groups, the
    same parameter order), so each saved index is the parameter at that place now, named by its FQN."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, strict=False)
    weights = load_file(str(path / "model.safetensors"))
    missing = set(model.state_dict()) - set(weights) - _tied_keys(model) - _frozen(model)
    if missing:
        raise CheckpointError(f"{path}: weights do not match the model (missing {sorted(missing)})")
    set_model_state_dict(model, weights, options=whole)
    saved = matching_groups(torch.load(path / "optimizer.pt", weights_only=True), optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    fqn = {}
    for then, now in zip(saved["param_groups"], optimizer.param_groups):
        fqn.update({index: names[id(p)] for index, p in zip(then["params"], now["params"])})
    state = {"state": {fqn[i]: s for i, s in saved["state"].items()},
             "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=whole)
    for name, module in kept.items():
        saved = load_file(str(path / f"{name}.safetensors"))
        missing = set(module.state_dict()) - set(saved) - _tied_keys(module)
        if missing:
            raise CheckpointError(f"{path}/{name}.safetensors: weights do not match the {name} (missing {sorted(missing)})")
        set_model_state_dict(module, saved, options=whole)


def _load_sharded(folder: Path, model, optimizer, info: DistInfo, kept: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    absent = [name for name in kept if not any(key.startswith(f"kept.{name}.") for key in saved)]
    if absent:
        raise CheckpointError(f"{folder.parent} holds no {', '.join(absent)}: it was written by a run that did not keep "
                              f"{'it' if len(absent) == 1 else 'them'}")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
             **{f"kept.{name}": get_model_state_dict(module) for name, module in kept.items()}}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not info.enabled)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    for name, module in kept.items():
        set_model_state_dict(module, state[f"kept.{name}"])


def _frozen(model) -> set[str]:
    """State-dict names of frozen parameters (each name of a tied one)."""
    return {name for name, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.nn.Parameter) and not t.requires_grad}


def _save_weights(model, path: Path) -> None:
    """The model's weights. A model with frozen parameters (LoRA's base) stores only the trained
    ones: the frozen ones are those of the folder it was loaded from, as they are on resume."""
    frozen = _frozen(model)
    if not frozen:
        save_model(model, str(path))
        return
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in frozen}, str(path))


def _tied_keys(model) -> set[str]:
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def publish_folder(tmp: Path, final: Path, synced: bool = False) -> None:
    """Put the finished folder ``tmp`` in place of ``final`` (a model folder, a checkpoint): its
    files on disk first (``synced``: they are), then the renames, so that ``final`` is never a
    half-written folder. An earlier ``final`` is renamed aside (``<final>.old``) and removed once
    the new one is in place; a kill between the two renames leaves it there whole, and
    ``restore_set_aside`` puts it back."""
    if not synced:
        _fsync_dir(tmp)
    aside = final.with_name(final.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    _fsync_folder(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def restore_set_aside(folder: Path) -> list[Path]:
    """Put back every ``X.old`` of ``folder`` (and of its checkpoints/) whose ``X`` is missing:
    ``publish_folder`` was killed between its renames. Returns the folders put back."""
    put_back = []
    for aside in sorted([*folder.glob("*.old"), *checkpoint_dir(folder).glob("*.old")]):
        final = aside.with_name(aside.name[: -len(".old")])
        if aside.is_dir() and not final.exists():
            aside.rename(final)
            put_back.append(final)
        elif aside.is_dir():  # the new one is in place: the rest of the earlier one
            shutil.rmtree(aside, ignore_errors=True)
    return put_back


def _fsync_folder(path: Path) -> None:
    """The folder's own entries (renames, new files) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(path: Path, only: str | None = None) -> None:
    """Every file below ``path`` (or just its file ``only``) and the entries of the folders that
    hold them on disk: a file's own fsync does not make its name in the folder durable."""
    files = [path / only] if only else [p for p in path.rglob("*") if p.is_file()]
    _fsync_files(files)
    for folder in sorted({f.parent for f in files} | {path}):
        _fsync_folder(folder)
