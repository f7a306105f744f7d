"""train.micro_batch_size in GRPO and PPO: the update forward split in micro-batches gives the
whole-batch update (global counts in every reduction)."""

import pytest
import torch
from methods_setup import RUNS, method_config

from rlhfkit.methods.common import load_policy
from rlhfkit.train.logging import read_metrics


@pytest.mark.parametrize("method", ["grpo", "ppo", "ppo-ptx"])
def test_micro_batches_give_the_whole_batch_update(method, tiny, tmp_path, monkeypatch):
    import rlhfkit.methods.ppo as ppo
    from rlhfkit.train.config import replace

    ptx_rows, ptx_loss = [], ppo.ptx_loss
    monkeypatch.setattr(ppo, "ptx_loss", lambda actor, batch, *a: ptx_rows.append(len(batch.input_ids))
                        or ptx_loss(actor, batch, *a))
    import rlhfkit.models.reward as reward_module

    scored, forward = [], reward_module._reward_scores  # PPO's scoring forwards are micro-batched too
    monkeypatch.setattr(reward_module, "_reward_scores", lambda model, ids, *a: scored.append(len(ids))
                        or forward(model, ids, *a))
    results = {}
    for micro in (0, 1, 2):  # PPO: 4 rows per minibatch (and 4 ptx rows); GRPO: 16 rows; micro-batches of 1 and 2
        out = tmp_path / f"m{micro}"
        cfg = method_config(method.split("-")[0], tiny, out, 2, micro_batch_size=micro, log_every=1)
        if method == "ppo-ptx":  # the ptx rows are micro-batched too
            cfg = replace(cfg, ptx_data=str(tiny["data"] / "sft_train.jsonl"), ptx_coef=0.5)
        ptx_rows.clear(), scored.clear()
        RUNS[method.split("-")[0]](cfg)
        if method != "grpo":  # the reward model scored 8 rows a step at once, or 1 or 2 at a time
            assert scored and max(scored) == (micro or cfg.prompts_per_step) and sum(scored) == 2 * cfg.prompts_per_step
        if method == "ppo-ptx":  # forwards of at most micro rows: 4 at once, or 4 of 1, or 2 of 2
            assert ptx_rows and max(ptx_rows) == (micro or 4) and sum(ptx_rows) % 4 == 0
        model, _ = load_policy(str(out / "model"), None)
        results[micro] = ([m["train/loss"] for m in read_metrics(out)], [p.detach() for p in model.parameters()])
    whole_losses, whole_weights = results[0]
    base, _ = load_policy(str(tiny["base"]), None)
    assert any(not torch.equal(p, q) for p, q in zip(whole_weights, base.parameters()))
    for micro in (1, 2):
        losses, weights = results[micro]
        assert losses == pytest.approx(whole_losses, abs=1e-6)
        if method == "ppo-ptx":
            ptx = [m["train/ptx_loss"] for m in read_metrics(tmp_path / f"m{micro}")]
            assert ptx == pytest.approx([m["train/ptx_loss"] for m in read_metrics(tmp_path / "m0")], abs=1e-6)
        for p, q in zip(weights, whole_weights):  # Adam moves each weight by ~lr = 1e-4 a step; summation
            torch.testing.assert_close(p, q, atol=1e-5, rtol=0)  # order alone flips a rare near-eps element


def test_grpo_learned_rewards_and_bf16_pi_old_in_a_run(tiny, tmp_path, monkeypatch):
    """Through run_grpo: an rm: reward scores train.micro_batch_size rows per forward, and under
    train.dtype=bf16 with mu = 2 pi_old is a forward (the sampler's fp32 log-probs are logged
    apart from it) whose samples sampling_correction weighs."""
    from methods_setup import reward_folder

    import rlhfkit.models.reward as reward_module
    from rlhfkit.methods.grpo import run_grpo
    from rlhfkit.train.config import replace

    scored, forward = [], reward_module._reward_scores
    monkeypatch.setattr(reward_module, "_reward_scores", lambda model, ids, *a: scored.append(len(ids))
                        or forward(model, ids, *a))
    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 1, micro_batch_size=4, log_every=1),
                  rewards=f"rm:{reward_folder(tiny)}")
    run_grpo(cfg)
    assert scored == [4, 4, 4, 4]  # 4 prompts x 4 samples, 4 rows a forward
    run_grpo(replace(cfg, train__out_dir=str(tmp_path / "bf16"), train__dtype="bf16"))
    logged = read_metrics(tmp_path / "bf16")[0]
    assert logged["train/logprob_gap"] > 1e-4 and "train/sampling_weight_mean" in logged
    assert "train/sampling_weight_mean" not in read_metrics(tmp_path / "g")[0]  # fp32: the sampler's are pi_old
