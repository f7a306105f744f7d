"""KTO (methods/kto.py): the objective against a plain transformers forward, the step's reference
point over micro-batches, and a run that learns the tiny default's preferences."""

import pytest
import torch
from helpers import quiet_train

from rlhfkit.data.rows import read_rows
from rlhfkit.data.unpaired import collate_unpaired, encode_unpaired, with_mismatched
from rlhfkit.methods.kto import KTOConfig, kto_objective, run_kto
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.models.lora import Reference
from rlhfkit.train.logging import read_metrics


def answer_logps(model, batch, grad: bool = False) -> torch.Tensor:
    """log pi(answer | prompt) of each row of a padded batch, from transformers' own forward."""
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    picked = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return (picked * batch.completion_mask[:, 1:]).sum(-1)


def test_the_loss_reads_one_reference_point_over_the_steps_micro_batches(tiny):
    """Two micro-batches of 4: the step's z_0 is the mean log(pi / pi_ref) of all 8 mismatched
    pairs (clamped at 0), and the two losses sum to the paper's mean over the 8 examples, computed
    here from transformers' forwards of the policy and of a reference with noised weights."""
    tokenizer = load_tokenizer(str(tiny["base"]))
    policy = load_causal_lm(str(tiny["base"]), tokenizer)
    ref_module = load_causal_lm(str(tiny["base"]), tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref_module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = read_rows(str(tiny["data"] / "prefs_train.jsonl"))[:4]
    examples = with_mismatched(encode_unpaired(rows, tokenizer, max_length=64)[0], 64, seed=0)
    cfg = KTOConfig(model=str(tiny["base"]), train_data="x", beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    objective = kto_objective(cfg, policy, Reference(module=ref_module), "cpu")
    batches = [collate_unpaired(examples[i: i + 4], tokenizer.pad_token_id) for i in (0, 4)]
    totals = {}
    for b in batches:
        for k, v in objective.counts(b).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    total = sum(objective.loss(policy, b, totals)[0].detach() for b in batches)

    kl = torch.cat([answer_logps(policy, b.mismatched) - answer_logps(ref_module, b.mismatched) for b in batches])
    z0 = max(float(kl.mean()), 0.0)
    assert z0 > 0.05  # noise lowers the reference's likelihood: a point that is not its clamp
    r = torch.cat([answer_logps(policy, b.matched) - answer_logps(ref_module, b.matched) for b in batches])
    good = torch.cat([b.desirable for b in batches]).float()
    terms = good * 1.3 * (1 - torch.sigmoid(0.5 * (r - z0))) + (1 - good) * 0.7 * (1 - torch.sigmoid(0.5 * (z0 - r)))
    assert abs(total.item() - terms.mean().item()) < 1e-5
    assert totals["desirable"] == 4 and totals["examples"] == 8
    # the gradient is that of the matched answers' terms alone, z_0 and the reference held constant
    policy.zero_grad()
    sum(objective.loss(policy, b, totals)[0] for b in batches).backward()
    ours = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    mine = torch.cat([answer_logps(policy, b.matched, grad=True) for b in batches])
    r = mine - torch.cat([answer_logps(ref_module, b.matched) for b in batches])
    (good * 1.3 * (1 - torch.sigmoid(0.5 * (r - z0))) + (1 - good) * 0.7 * (1 - torch.sigmoid(0.5 * (z0 - r)))).mean().backward()
    theirs = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert theirs.norm() > 1e-3 and (ours - theirs).norm() < 1e-4 * theirs.norm()


def test_the_steps_do_not_depend_on_the_micro_batches(tiny, tmp_path):
    """The mismatched pairs and z_0 are the step's: one micro-batch of 8 rows, or 8 of one row,
    train to the same losses (a micro-batch of one row has a pair too). Desirable answers only,
    whose likelihood the steps raise, so that z_0 is soon above its clamp at 0."""
    import json

    rows = [json.loads(line) for line in (tiny["data"] / "prefs_train.jsonl").read_text().splitlines()[:64]]
    data = tmp_path / "desirable.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n"
                            for r in rows))

    def losses(name, micro):
        cfg = KTOConfig(model=str(tiny["base"]), train_data=str(data), max_length=64, beta=0.5,
                        train=quiet_train(tmp_path / name, max_steps=3, batch_size=8, micro_batch_size=micro, lr=1e-3,
                                          log_every=1))
        run_kto(cfg)
        return [v for m in read_metrics(tmp_path / name) if "train/loss" in m for v in (m["train/loss"], m["train/kl"])]

    whole, single = losses("whole", 8), losses("single", 1)
    logged = [m for m in read_metrics(tmp_path / "whole") if "train/loss" in m]
    assert "train/rewards_chosen" in logged[0]  # no undesirable answer: their means and the margin are left out
    assert not {"train/rewards_rejected", "train/logps_rejected", "train/margin"} & set(logged[0])
    assert len(whole) == 6 and whole[-1] > 1e-3  # step 3: the policy has moved, z_0 is not 0
    assert single == pytest.approx(whole, abs=1e-5)


def test_under_bf16_the_start_is_exactly_its_reference(tiny, tmp_path):
    """train.dtype=bf16: the policy's and the reference's forwards run under the same autocast in the
    same layout, so at step 1 every r is 0 and so is z_0 (each answer's loss w (1 - sigma(0))), and
    the steps after train (z_0 moves off 0, the loss off 0.5)."""
    cfg = KTOConfig(model=str(tiny["base"]), train_data=str(tiny["data"] / "prefs_train.jsonl"), max_length=64,
                    beta=0.5, train=quiet_train(tmp_path / "bf16", max_steps=3, batch_size=8, lr=1e-3, log_every=1,
                                                dtype="bf16"))
    run_kto(cfg)
    logged = [m for m in read_metrics(tmp_path / "bf16") if "train/loss" in m]
    assert logged[0]["train/kl"] == 0.0 and logged[0]["train/loss"] == 0.5
    assert logged[0]["train/rewards_chosen"] == 0.0 and logged[0]["train/rewards_rejected"] == 0.0
    assert logged[-1]["train/loss"] != 0.5


@pytest.mark.slow
def test_kto_raises_preference_accuracy_without_collapse(tiny, sft_run, tmp_path):
    """DPO's test set-up (the SFT snapshot, the same pairs read as unpaired answers, 150 steps of 32
    rows, beta 0.5): held-out preference accuracy (each pair's two implicit rewards compared, 0.5
    at the start where the policy is its reference) reaches 0.7, the implicit rewards' gap opens,
    and exact match does not collapse."""
    data = tiny["data"]
    cfg = KTOConfig(model=str(sft_run["out"] / "snapshot"), train_data=str(data / "prefs_train.jsonl"),
                    eval_data=str(data / "prefs_eval.jsonl"), eval_prompts=str(data / "prompts_eval.jsonl"),
                    max_length=64, eval_limit=300, beta=0.5,
                    train=quiet_train(tmp_path / "kto", max_steps=150, batch_size=32, lr=3e-4, warmup_steps=10))
    summary = run_kto(cfg)
    assert summary["preference_accuracy"] >= 0.7, summary
    assert summary["margin"] > 0.1, summary
    assert summary["accuracy"] >= summary["accuracy_before"] - 0.1, summary
    logged = [m for m in read_metrics(tmp_path / "kto") if "train/kl" in m]
    assert len(logged) > 10 and all(m["train/kl"] >= 0 for m in logged)


def test_bco_reads_the_reward_shift_of_earlier_steps_and_resumes(tiny, tmp_path):
    """loss_type=bco: the objective's loss is each answer's cross-entropy against the shift's delta
    (from transformers' forwards), the shift gathers every answer's reward; a run logs delta 0 at
    step 1 and a moved one later, and a run cut after step 2 and resumed gives the straight run's
    losses and deltas (the checkpoint keeps the running mean)."""
    from types import SimpleNamespace

    from methods_setup import method_config

    from rlhfkit.methods.common import RewardShift
    from rlhfkit.train.config import replace
    from rlhfkit.train.dist import DistInfo

    tokenizer = load_tokenizer(str(tiny["base"]))
    policy = load_causal_lm(str(tiny["base"]), tokenizer)
    ref_module = load_causal_lm(str(tiny["base"]), tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref_module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    rows = read_rows(str(tiny["data"] / "prefs_train.jsonl"))[:4]
    batch = collate_unpaired(encode_unpaired(rows, tokenizer, max_length=64)[0], tokenizer.pad_token_id)
    cfg = KTOConfig(model=str(tiny["base"]), train_data="x", beta=0.5, loss_type="bco")
    run = SimpleNamespace(state={"reward_shift": [0.2, 4]}, keep={}, info=DistInfo())
    shift = RewardShift(run)
    objective = kto_objective(cfg, policy, Reference(module=ref_module), "cpu", shift=shift)
    with torch.no_grad():
        loss, metrics = objective.loss(policy, batch, objective.counts(batch))
    r = 0.5 * (answer_logps(policy, batch.matched) - answer_logps(ref_module, batch.matched))
    good = batch.desirable.float()
    by_hand = -(good * torch.nn.functional.logsigmoid(r - 0.2) + (1 - good) * torch.nn.functional.logsigmoid(0.2 - r))
    assert abs(loss.item() - by_hand.mean().item()) < 1e-5 and abs(float(metrics["reward_shift"]) - 0.2) < 1e-7
    shift.update(1)  # 4 earlier answers at 0.2, then these 8
    assert run.keep["reward_shift"][1] == 12 and abs(run.keep["reward_shift"][0] - (0.8 + float(r.sum())) / 12) < 1e-5

    def config(out, steps, **train):
        return replace(method_config("kto", tiny, out, steps, log_every=1, save_every=2, **train), loss_type="bco")

    run_kto(config(tmp_path / "full", 4))
    lines = [m for m in read_metrics(tmp_path / "full") if "train/loss" in m]
    assert lines[0]["train/reward_shift"] == 0.0 and abs(lines[-1]["train/reward_shift"]) > 1e-3
    run_kto(config(tmp_path / "cut", 2))
    run_kto(config(tmp_path / "cut", 4, resume=True))
    cut = [m for m in read_metrics(tmp_path / "cut") if "train/loss" in m]
    assert [m["train/loss"] for m in cut] == [m["train/loss"] for m in lines]
    assert [m["train/reward_shift"] for m in cut] == [m["train/reward_shift"] for m in lines]
