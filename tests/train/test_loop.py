"""The shared loop: accumulation == big batch, exact resume, atomic checkpoints, NaN guard."""

import json

import pytest
import torch
from helpers import quiet_train

from rlhfkit.data.encode import collate_sft, encode_sft
from rlhfkit.data.rows import read_rows
from rlhfkit.methods.common import load_policy
from rlhfkit.methods.sft import sft_objective
from rlhfkit.train.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint
from rlhfkit.train.logging import read_metrics
from rlhfkit.train.loop import Objective, train_offline
from rlhfkit.train.optim import NonFiniteError
from rlhfkit.train.run import start_run


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok = load_policy(str(tiny["base"]), None)
    rows = read_rows(tiny["data"] / "sft_train.jsonl")[:256]
    examples, _ = encode_sft(rows, tok, 64)
    return tiny, tok, examples


def _run(setup, out, crash_at_step=None, **kw):
    tiny, tok, examples = setup
    model, _ = load_policy(str(tiny["base"]), None)
    objective = sft_objective()
    if crash_at_step is not None:  # the process dies inside this step's forward
        calls = {"n": 0}

        def crashing(model, batch, totals):
            calls["n"] += 1
            if calls["n"] == crash_at_step:
                raise KeyboardInterrupt("killed")
            return sft_objective().loss(model, batch, totals)

        objective = Objective(objective.counts, crashing)
    cfg = quiet_train(out, **kw)
    run = train_offline(start_run(cfg, {}, "sft"), model, examples, lambda r: collate_sft(r, tok.pad_token_id),
                        objective)
    run.close()
    return model, run


def test_accumulation_2x8_equals_batch_16(setup, tmp_path):
    a, _ = _run(setup, tmp_path / "a", max_steps=1, batch_size=16, lr=1e-3, schedule="constant")
    b, _ = _run(setup, tmp_path / "b", max_steps=1, batch_size=16, micro_batch_size=8, lr=1e-3, schedule="constant")
    (ma,), (mb,) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert mb["train/loss"] == pytest.approx(ma["train/loss"], rel=1e-6)
    assert mb["train/grad_norm"] == pytest.approx(ma["train/grad_norm"], rel=1e-5)
    base, _ = load_policy(str(setup[0]["base"]), None)
    moved, differ, total = 0.0, 0, 0
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), base.parameters()):
        # Adam's first step moves each weight by lr * g / (|g| + eps): the same in both runs except
        # where |g| is near eps, where summation order alone can flip it.
        differ += int(((pa - pb).abs() > 1e-6).sum())
        total += pa.numel()
        moved = max(moved, (pa - p0).abs().max().item())
    assert differ <= total * 1e-3, (differ, total)
    assert moved > 1e-4  # the step really changed the weights (Adam moves each by ~lr)


def test_resume_gives_the_same_losses(setup, tmp_path):
    kw = dict(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=3, save_every=5, keep_checkpoints=3)
    _run(setup, tmp_path / "full", **kw)
    full = [m["train/loss"] for m in read_metrics(tmp_path / "full")]
    # Interrupted run: killed during step 11 (last checkpoint: step 10), resumed in a fresh process state.
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "cut", crash_at_step=11, **kw)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000010"
    _, result = _run(setup, tmp_path / "cut", **{**kw, "resume": True})
    cut = [m["train/loss"] for m in read_metrics(tmp_path / "cut")]
    assert result.done == 20 and len(full) == 20 and len(cut) == 20
    # Bit-identical on CPU: same weights, optimizer moments, lr schedule, data order and RNG.
    assert cut[10:] == full[10:]
    assert complete_checkpoints(tmp_path / "cut")[-1].name == "step-0000020"


def test_resume_option_is_not_ignored(setup, tmp_path):
    kw = dict(max_steps=4, batch_size=8, lr=3e-3, save_every=2)
    _run(setup, tmp_path / "r", **{**kw, "max_steps": 2})
    _, result = _run(setup, tmp_path / "r", **{**kw, "resume": True})
    losses = [m["step"] for m in read_metrics(tmp_path / "r")]
    assert losses == [1, 2, 3, 4]  # steps 3 and 4 appended; 1 and 2 not redone
    with pytest.raises(CheckpointError, match="already holds a run"):
        _run(setup, tmp_path / "r", **kw)  # a fresh start over an old run is refused
    # resume=true where there is no complete checkpoint: a fresh start (said in one line), not an error
    _, result = _run(setup, tmp_path / "empty", **{**kw, "resume": True})
    assert result.done == 4 and [m["step"] for m in read_metrics(tmp_path / "empty")] == [1, 2, 3, 4]


def test_checkpoint_without_marker_is_skipped(setup, tmp_path):
    kw = dict(max_steps=4, batch_size=8, lr=3e-3, save_every=2, keep_checkpoints=5)
    _run(setup, tmp_path / "m", **kw)
    ckpts = complete_checkpoints(tmp_path / "m")
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]
    (ckpts[-1] / "COMPLETE").unlink()  # as if the process died while writing step 4
    assert latest_checkpoint(tmp_path / "m").name == "step-0000002"
    state = json.loads((latest_checkpoint(tmp_path / "m") / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["samples_seen"] == 16


def test_nan_loss_stops_before_the_optimizer_step(setup, tmp_path):
    tiny, tok, examples = setup
    model, _ = load_policy(str(tiny["base"]), None)
    inner = sft_objective()
    calls = {"n": 0}

    def poisoned(model, batch, totals):
        calls["n"] += 1
        loss, metrics = inner.loss(model, batch, totals)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    cfg = quiet_train(tmp_path / "nan", max_steps=5, batch_size=8, lr=3e-3, save_every=1, keep_checkpoints=10)
    with pytest.raises(NonFiniteError, match="step 3: the loss is nan"):
        train_offline(start_run(cfg, {}, "sft"), model, examples, lambda r: collate_sft(r, tok.pad_token_id),
                      Objective(inner.counts, poisoned))
    assert latest_checkpoint(tmp_path / "nan").name == "step-0000002"
    # The weights in memory are those after step 2: the poisoned step never reached the optimizer.
    import copy

    from safetensors.torch import load_model

    saved = copy.deepcopy(model)
    with torch.no_grad():
        for p in saved.parameters():
            p.zero_()
    load_model(saved, str(latest_checkpoint(tmp_path / "nan") / "model.safetensors"), strict=False)
    for (name, p), q in zip(model.named_parameters(), saved.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


@pytest.mark.parametrize("rows, warned", [(3, True), (8, False)])
def test_a_step_larger_than_the_data_is_said(tmp_path, capsys, rows, warned):
    # BatchOrder fills every step: 8 a step from 3 rows holds each of them two or three times
    from rlhfkit.train.config import TrainConfig
    from rlhfkit.train.run import DistInfo, Run

    run = Run(TrainConfig(out_dir=str(tmp_path), batch_size=8), {}, DistInfo(), "dpo", "optimizer step")
    run.plan(rows, 8)
    said = "warning: train.batch_size=8 is more than the 3 rows of the training data: every step holds some of them"
    assert (said in capsys.readouterr().err) is warned
