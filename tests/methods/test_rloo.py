"""RLOO (methods/rloo.py): GRPO's loop with the leave-one-out advantages, the KL in the reward and
TRL's loss on the answer's whole ratio."""

import dataclasses

import pytest
import torch
from helpers import quiet_train
from methods_setup import even_answer_digits, method_config

import rlhfkit.methods.grpo as grpo_module
from rlhfkit.losses.grpo import loo_advantages
from rlhfkit.methods.rloo import RLOOConfig, run_rloo
from rlhfkit.train.config import ConfigError, load_config, replace
from rlhfkit.train.logging import read_metrics

RLOO_KEYS = ("advantage_estimator", "scale_rewards", "loss_type", "importance_sampling_level", "beta")


def rloo_config(tiny, out, steps, **changes) -> RLOOConfig:
    """The tests' small GRPO set-up (methods_setup) under RLOO's defaults."""
    grpo = method_config("grpo", tiny, out, steps, log_every=1)
    kept = {f.name: getattr(grpo, f.name) for f in dataclasses.fields(grpo) if f.name not in RLOO_KEYS}
    return RLOOConfig(**{**kept, **changes})


def capture_updates(monkeypatch) -> list:
    seen = []
    original = grpo_module.update
    monkeypatch.setattr(grpo_module, "update", lambda run, policy, ref, batch, *a: seen.append((ref, batch)) or
                        original(run, policy, ref, batch, *a))
    return seen


def test_rloos_defaults_are_trls_and_its_settings_are_checked(tiny, tmp_path):
    cfg = RLOOConfig()
    assert (cfg.advantage_estimator, cfg.scale_rewards, cfg.loss_type, cfg.importance_sampling_level, cfg.beta,
            cfg.normalize_advantages, cfg.reward_clip_range) == ("rloo", "none", "rloo", "sequence", 0.05, False, None)
    with pytest.raises(ConfigError, match="advantage_estimator=rloo.*scale_rewards=group"):
        RLOOConfig(scale_rewards="group")
    with pytest.raises(ConfigError, match="normalize_advantages=True is used by advantage_estimator=rloo"):
        replace(method_config("grpo", tiny, tmp_path, 1), normalize_advantages=True)
    with pytest.raises(ConfigError, match="loss_type=rloo.*importance_sampling_level=sequence"):
        RLOOConfig(importance_sampling_level="token")
    with pytest.raises(ConfigError, match="low < high"):
        RLOOConfig(reward_clip_range=(1.0, -1.0))
    # TRL's YAML list, or key=value on the command line
    assert load_config(RLOOConfig, None, ["reward_clip_range=[-0.5, 2]"]).reward_clip_range == (-0.5, 2.0)
    with pytest.raises(ConfigError, match="reward_clip_range' expects a list of 2"):
        load_config(RLOOConfig, None, ["reward_clip_range=0.5"])
    # an offline batch size is refused by the method's own name (run_rloo is GRPO's loop)
    batch = replace(rloo_config(tiny, tmp_path, 1), train=dataclasses.replace(RLOOConfig().train, batch_size=16))
    with pytest.raises(ConfigError, match=r"^rloo: train.batch_size does not apply"):
        run_rloo(batch)


def test_the_kl_is_in_the_reward_before_the_leave_one_out_baseline(tiny, tmp_path, monkeypatch):
    """Step 2 (the policy has moved from its reference): the update receives, for every answer,
    A_i = R_i - mean_{j != i} R_j with R_i = clip(r_i) - beta sum_t (log pi_old - log pi_ref), as computed
    here from the start model's own log-probs; its loss takes no reference; the logged kl is the
    step's mean k1 per token."""
    from rlhfkit.methods.common import chunked_logprobs
    from rlhfkit.models.load import load_causal_lm, load_tokenizer

    seen = capture_updates(monkeypatch)
    out = tmp_path / "rloo"
    run_rloo(rloo_config(tiny, out, 2, beta=0.5, mu=1, reward_clip_range=(0.0, 0.2)), reward_fns=[even_answer_digits])
    ref, batch = seen[1]
    assert ref is None
    samples, mask = batch.samples, batch.samples.completion_mask
    start = load_causal_lm(str(tiny["base"]), load_tokenizer(str(tiny["base"])))
    ref_logprobs = chunked_logprobs(start, samples, [torch.arange(mask.shape[0])], group=4)
    kl = ((samples.logprobs - ref_logprobs) * mask).sum(-1)  # pi_old: the sampler's, equal to 1e-6
    assert kl.abs().max() > 1e-3  # it has moved
    assert (batch.outcome.rewards > 0.2).any()  # the clip bites, before the KL is taken off
    expected = loo_advantages(batch.outcome.rewards.clamp(0.0, 0.2) - 0.5 * kl, 4)
    assert torch.allclose(batch.advantages[:, 0], expected, atol=1e-5)
    assert torch.allclose(batch.advantages, batch.advantages[:, :1].expand_as(batch.advantages))
    logged = [m for m in read_metrics(out) if "train/loss" in m]
    assert logged[1]["train/kl"] == pytest.approx(float(kl.sum() / mask.sum()), rel=1e-4)
    # step 1, the policy its reference: pi_old and pi_ref are one forward of equal weights, so the KL is exactly
    # 0 (the sampler's log-probs are 1e-8 apart a token, which would have reached every advantage)
    assert logged[0]["train/kl"] == 0.0
    _, first = seen[0]
    assert torch.equal(first.advantages[:, 0], loo_advantages(first.outcome.rewards.clamp(0.0, 0.2), 4))


def test_under_bf16_the_kl_starts_at_exactly_0(tiny, tmp_path, monkeypatch):
    """train.dtype=bf16: pi_old and pi_ref are forwards under the same autocast, so at step 1 the
    KL in the reward is exactly 0 and the advantages are the rewards' leave-one-out alone."""
    seen = capture_updates(monkeypatch)
    out = tmp_path / "bf16"
    cfg = rloo_config(tiny, out, 2, beta=0.5, mu=1)
    run_rloo(replace(cfg, train__dtype="bf16"), reward_fns=[even_answer_digits])
    logged = [m for m in read_metrics(out) if "train/loss" in m]
    assert logged[0]["train/kl"] == 0.0 and logged[1]["train/kl"] != 0.0
    _, first = seen[0]
    assert torch.equal(first.advantages[:, 0], loo_advantages(first.outcome.rewards, 4))


def test_normalize_advantages_and_reward_clip_range_reach_the_update(tiny, tmp_path, monkeypatch):
    seen = capture_updates(monkeypatch)
    run_rloo(rloo_config(tiny, tmp_path / "clip", 1, beta=0.0, reward_clip_range=(0.0, 0.2)),
             reward_fns=[even_answer_digits])
    _, batch = seen[-1]
    clipped = batch.outcome.rewards.clamp(0.0, 0.2)
    assert (batch.outcome.rewards > 0.2).any()  # the clip bit
    assert torch.allclose(batch.advantages[:, 0], loo_advantages(clipped, 4), atol=1e-6)
    run_rloo(rloo_config(tiny, tmp_path / "norm", 1, beta=0.0, normalize_advantages=True),
             reward_fns=[even_answer_digits])
    _, batch = seen[-1]
    raw = loo_advantages(batch.outcome.rewards, 4).double()
    assert raw.abs().max() > 0
    live = raw != 0  # an advantage of exactly 0 (a group without a signal) stays 0
    expected = torch.where(live, (raw - raw.mean()) / (raw.std() + 1e-4), torch.zeros_like(raw))
    assert torch.allclose(batch.advantages[:, 0].double(), expected, atol=1e-5)


def test_the_rloo_loss_has_reinforces_gradient_on_policy_and_clips_the_whole_ratio_after(tiny, tmp_path):
    """mu = 1: s_i = 1, and the gradient is REINFORCE's -1/G sum_i A_i grad log pi(o_i|q), which is
    also luspo's (GSPO's ratio, each answer's term times its length): the same gradient norm. mu = 2: the second pass's ratios have left 1, and the whole ratio (a product over
    the answer's tokens) leaves the band further than GSPO's geometric mean."""
    def logged(name, **changes):
        run_rloo(rloo_config(tiny, tmp_path / name, 1, beta=0.0, **changes), reward_fns=[even_answer_digits])
        return [m for m in read_metrics(tmp_path / name) if "train/loss" in m][0]

    rloo, luspo = logged("rloo", mu=1), logged("luspo", mu=1, loss_type="luspo")
    assert rloo["train/grad_norm"] > 1e-3
    assert rloo["train/grad_norm"] == pytest.approx(luspo["train/grad_norm"], rel=1e-5)
    assert abs(rloo["train/loss"]) < 1e-6  # -mean(A): 0 for whole groups' leave-one-out advantages
    rloo2, luspo2 = logged("rloo2", mu=2, eps_low=0.05), logged("luspo2", mu=2, loss_type="luspo", eps_low=0.05)
    assert rloo2["train/clip_frac_low"] + rloo2["train/clip_frac_high"] > \
        luspo2["train/clip_frac_low"] + luspo2["train/clip_frac_high"]


@pytest.mark.slow
def test_rloo_raises_accuracy(tiny, sft_run, tmp_path):
    """RLOO with TRL's defaults (the KL in the reward, beta 0.05) from the SFT snapshot, the GRPO
    test's set-up: held-out accuracy closes >= 20% of the gap to 1.0 in 300 steps."""
    data = tiny["data"]
    cfg = RLOOConfig(model=str(sft_run["out"] / "snapshot"), train_data=str(data / "prompts_train.jsonl"),
                     eval_data=str(data / "prompts_eval.jsonl"), eval_limit=300, group_size=8, prompts_per_step=16,
                     max_new_tokens=16, eval_max_new_tokens=16,
                     train=quiet_train(tmp_path / "rloo", max_steps=300, lr=1e-4, schedule="constant", log_every=10))
    summary = run_rloo(cfg)
    before, after = summary["accuracy_before"], summary["accuracy"]
    assert after >= before + 0.2 * (1 - before), (before, after)
    logged = [m for m in read_metrics(tmp_path / "rloo") if "train/kl" in m]
    assert logged[-1]["train/kl"] > 0


def test_normalize_advantages_leaves_a_group_with_one_scored_answer_out_of_the_statistics():
    """Two groups of 4: in the second every reward but one abstained (NaN), so no answer of it has a
    baseline: A = 0 there, and the batch's mean and std are the first group's alone (TRL's NaN)."""
    from types import SimpleNamespace

    from rlhfkit.methods.grpo import rloo_advantages
    from rlhfkit.methods.grpo_batch import Rollout
    from rlhfkit.rollout.rewards import OutcomeScores
    from rlhfkit.train.dist import DistInfo

    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, nan, 2.0, nan, nan])
    batch = Rollout(SimpleNamespace(completion_mask=torch.ones(8, 3)), OutcomeScores(rewards, {}, {}),
                    torch.zeros(8, 3), 0.0)
    cfg = RLOOConfig(group_size=4, beta=0.0, normalize_advantages=True)
    out, metrics = rloo_advantages(SimpleNamespace(info=DistInfo()), None, None, batch, cfg)
    first = loo_advantages(rewards[:4], 4).double()
    expected = torch.cat([(first - first.mean()) / (first.std() + 1e-4), torch.zeros(4, dtype=torch.double)])
    assert torch.allclose(out.advantages[:, 0].double(), expected, atol=1e-6) and metrics == {}
    assert torch.equal(out.advantages[:, 1], out.advantages[:, 0])


def test_what_rloo_cannot_read_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"reward_clip_range=\(0.0, 1.0\) is used by advantage_estimator=rloo"):
        replace(method_config("grpo", tiny, tmp_path, 1), reward_clip_range=(0.0, 1.0))  # TRL's GRPO has none
    with pytest.raises(ConfigError, match="a process reward passed to run_grpo .*advantage_estimator=rloo takes"):
        run_rloo(rloo_config(tiny, tmp_path / "p", 1), reward_fns=[even_answer_digits],
                 process_fn=lambda prompts, completions, **_: [[] for _ in completions])
