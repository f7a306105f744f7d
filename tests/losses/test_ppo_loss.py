import math

import pytest
import torch

from rlhfkit.losses.ppo import (
    AdaptiveKL,
    explained_variance,
    gae,
    kl_penalty_rewards,
    policy_loss,
    value_loss,
)
from rlhfkit.losses.reduce import masked_whiten


def _gae_loop(rewards, values, mask, gamma, lam):
    """Plain Python GAE over each row's real tokens (a prefix), V = 0 after the last one."""
    adv_rows = []
    for r, v, m in zip(rewards.tolist(), values.tolist(), mask.tolist()):
        n = int(sum(m))
        adv, running = [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[t] = running
        adv_rows.append(adv)
    return torch.tensor(adv_rows)


def test_gae_equals_a_python_loop_and_ignores_masked_values():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6, [1] * 6 + [0]])
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.9)
    expected = _gae_loop(rewards, values, mask, 0.99, 0.9)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-6)
    noisy = values + (1 - mask) * 100.0  # garbage where there are no tokens changes nothing
    adv2, _ = gae(rewards + (1 - mask) * 50.0, noisy, mask, 0.99, 0.9)
    assert torch.allclose(adv, adv2, atol=1e-6)


def test_whitening_is_masked():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = masked_whiten(values, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()
    assert torch.allclose(out[mask.bool()], expected, atol=1e-5)


def test_kl_reward_and_score_land_where_the_spec_says():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.4, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-0.1, -0.6, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = kl_penalty_rewards(logprobs, ref, torch.tensor([2.0, -1.0]), mask, beta=0.1)
    expected = torch.tensor([
        [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0.0],  # the score is added on the last real token
        [-0.1 * -0.2, -0.1 * 0.2 - 1.0, 0.0, 0.0],
    ])
    assert torch.allclose(rewards, expected, atol=1e-7)
    assert kl[0, 3] == 0 and kl[1, 2] == 0


def test_the_k3_kl_penalty_by_hand():
    """kl_estimator=k3 (TRL's option): pi_ref/pi - log(pi_ref/pi) - 1 per token, >= 0 where k1 is
    negative, equal to 0 only where pi == pi_ref; the score still lands on the last real token."""
    import math

    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = kl_penalty_rewards(logprobs, ref, torch.tensor([2.0]), mask, beta=0.1, estimator="k3")
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0, 0.0]  # log(pi_ref/pi): -0.5, +1, 0
    assert kl[0].tolist() == pytest.approx(k3, abs=1e-6) and kl.min() >= 0
    assert rewards[0].tolist() == pytest.approx([-0.1 * k3[0], -0.1 * k3[1], 2.0, 0.0], abs=1e-6)


def test_clipped_policy_loss_by_hand_each_branch():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    loss, stats = policy_loss(logprobs, old, adv, torch.ones(1, 4), eps=0.2)
    # t0: A>0, ratio above 1.2 -> clipped: 1.2; t1: A<0, ratio below 0.8 -> clipped: 0.8 * -1;
    # t2: inside: 1.1 * 2; t3: A<0 and ratio high -> min picks the unclipped 1.5 * -1
    per_token = [1.2 * 1.0, 0.8 * -1.0, 1.1 * 2.0, 1.5 * -1.0]
    assert loss.item() == pytest.approx(-sum(per_token) / 4, abs=1e-6)
    assert stats["policy_clip_frac"].item() == pytest.approx(2 / 4)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, -1.0, 0.0]])
    loss, _ = value_loss(values, old, returns, torch.ones(1, 3), eps_value=0.2)
    # t0: clip(1.0) = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69; t1: clip(0.0) = 0.3 -> max(1, 1.69) = 1.69;
    # t2: inside the clip range -> 0.25
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 0.25) / 3, abs=1e-6)


def test_adaptive_kl_moves_beta_toward_the_target():
    ctl = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # above target: raise (error capped at 0.2)
    ctl = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    assert ctl.update(5.4, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))  # below target: lower
    assert ctl.beta < 0.1


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert not math.isnan(explained_variance(torch.zeros(1, 4), torch.zeros(1, 4), mask).item())


def test_gae_skips_an_interior_masked_position():
    # Real tokens at t = 0 and t = 2 (t = 1 masked), gamma 1, lambda 0.75, V = [0.5, (9), 0.2], r = [0, (5), 1].
    # Over the real tokens alone: A_2 = 1 - 0.2 = 0.8; A_0 = 0 + 0.2 - 0.5 + 0.75 * 0.8 = 0.3.
    # (Treating t = 1 as a zero-reward step, as before the fix, gave A_0 = -0.5 + 0.75 * 0.75 * 0.8 = -0.05.)
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.2]])
    mask = torch.tensor([[1, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.75)
    assert torch.allclose(adv, torch.tensor([[0.3, 0.0, 0.8]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.8, 0.0, 1.0]]), atol=1e-6)


def test_token_means_over_a_global_count_split_like_one_batch():
    torch.manual_seed(0)
    lp, old, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    whole, _ = policy_loss(lp, old, adv, mask)
    n = mask.sum().item()
    halves = [policy_loss(lp[i::2], old[i::2], adv[i::2], mask[i::2], num_tokens=n)[0] for i in range(2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), abs=1e-6)
    v_whole, _ = value_loss(lp, old, adv, mask)
    v_halves = [value_loss(lp[i::2], old[i::2], adv[i::2], mask[i::2], num_tokens=n)[0] for i in range(2)]
    assert (v_halves[0] + v_halves[1]).item() == pytest.approx(v_whole.item(), abs=1e-6)
