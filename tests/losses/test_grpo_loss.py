import math

import pytest
import torch

from rlhfkit.losses.grpo import group_advantages, grpo_loss, k3_kl, process_advantages


def test_orm_advantages_by_hand_including_an_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of G = 4
    adv = group_advantages(rewards, 4, eps=0.0 + 1e-12)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1] around mean 0.5
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std, atol=1e-6)
    assert torch.all(adv[4:] == 0)  # all rewards equal: no signal, no NaN
    no_std = group_advantages(rewards, 4, scale_std=False)  # Dr. GRPO
    assert torch.allclose(no_std[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_prm_advantages_by_hand():
    # Group of G = 2 with 5 completion tokens each. Output 0: steps end at tokens 1 and 3 with
    # rewards 1, 0; output 1: one step ending at token 2 with reward 1.
    adv = process_advantages([[1, 3], [2]], [[1.0, 0.0], [1.0]], group_size=2, length=5, eps=0.0)
    rewards = torch.tensor([1.0, 0.0, 1.0])
    mean, std = rewards.mean(), rewards.std()  # 2/3, sqrt(1/3)
    n = (rewards - mean) / std  # normalised together over the group's steps
    expected = torch.tensor([
        [n[0] + n[1], n[0] + n[1], n[1], n[1], 0.0],  # t <= 1 sees both steps, 2..3 only the second
        [n[2], n[2], n[2], 0.0, 0.0],
    ])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_k3_is_nonnegative_and_zero_at_equality():
    lp = torch.randn(1000) * 3
    ref = torch.randn(1000) * 3
    assert torch.all(k3_kl(lp, ref) >= 0)
    assert torch.all(k3_kl(lp, lp) == 0)
    # by hand: log pi = -1, log pi_ref = -2 -> ratio e^-1: e^-1 + 1 - 1
    assert abs(k3_kl(torch.tensor(-1.0), torch.tensor(-2.0)).item() - math.exp(-1)) < 1e-7


def _hand_loss(lp, old, adv, ref, mask, beta, eps):
    """The paper's objective written out with Python floats: 1/G sum_i 1/|o_i| sum_t (...)."""
    total = 0.0
    for i in range(len(lp)):
        n = sum(mask[i])
        acc = 0.0
        for t in range(len(lp[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(lp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            kl = math.exp(ref[i][t] - lp[i][t]) - (ref[i][t] - lp[i][t]) - 1
            acc += min(rho * adv[i][t], clipped * adv[i][t]) - beta * kl
        total += acc / n
    return -total / len(lp)


def test_full_loss_by_hand_with_clipping_active():
    # Second of mu = 2 updates: the policy has moved from pi_old, so some ratios leave [0.8, 1.2].
    lp = [[-0.5, -1.0, -0.2], [-2.0, -0.1, -3.0]]
    old = [[-0.9, -1.0, -0.1], [-1.5, -0.1, -3.0]]  # ratios e^0.4 = 1.49 (clipped above), e^-0.5 = 0.61 (below)
    adv = [[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]
    ref = [[-0.7, -1.1, -0.3], [-1.8, -0.2, -2.9]]
    mask = [[1, 1, 1], [1, 1, 0]]
    beta, eps = 0.04, 0.2
    t = lambda x: torch.tensor(x)  # noqa: E731
    loss, metrics = grpo_loss(t(lp), t(old), t(adv), t(mask), t(ref), beta, eps)
    assert abs(loss.item() - _hand_loss(lp, old, adv, ref, mask, beta, eps)) < 1e-6
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 5)  # token (0, 0)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 5)  # token (1, 0)


def test_mu1_ratio_is_one_in_value_not_in_gradient():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0]])
    loss, metrics = grpo_loss(lp, lp.detach(), adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx(-2.0) and metrics["ratio_mean"].item() == 1.0
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, -1.0]]))  # -A / |o| per token


def test_reductions_differ_as_documented():
    per = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    zeros = torch.zeros(2, 4)
    adv = -per  # so that -min(rho*A, ...) with rho = 1 gives back `per`
    paper, _ = grpo_loss(zeros, zeros, adv, mask, reduction="seq_mean_token_mean")
    dapo, _ = grpo_loss(zeros, zeros, adv, mask, reduction="token_mean")
    dr, _ = grpo_loss(zeros, zeros, adv, mask, reduction="seq_mean_token_sum_norm", max_tokens=4)
    assert paper.item() == pytest.approx((1.0 + 2.0) / 2)
    assert dapo.item() == pytest.approx(6.0 / 5)
    assert dr.item() == pytest.approx(6.0 / (2 * 4))


def test_a_group_of_equal_rewards_gets_exactly_zero():
    # In fp32 the mean of eight 0.7s is not 0.7: before the fix (0.7 - mean) / (std + 1e-4) was ~6e-4,
    # which DAPO's dynamic sampling read as signal.
    rewards = torch.full((8,), 0.7)
    assert torch.all(group_advantages(rewards, 8) == 0)
    assert torch.all(group_advantages(rewards, 8, scale_std=False) == 0)
    steps = process_advantages([[1, 2], [0]], [[0.7, 0.7], [0.7]], group_size=2, length=3)
    assert torch.all(steps == 0)


def test_group_size_one_is_refused():
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.train.config import ConfigError

    with pytest.raises(ConfigError, match="'group_size' must be >= 2"):
        GRPOConfig(group_size=1)


def test_clip_higher_by_hand():
    # eps_low 0.2, eps_high 0.28: a ratio of 1.25 with A > 0 is inside [0.8, 1.28], so not clipped
    # (it would be with the symmetric 0.2); 1.35 is clipped to 1.28; 0.7 with A < 0 is clipped to 0.8.
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.25, 1.35, 0.7]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, m = grpo_loss(lp, old, adv, torch.ones(1, 3), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-(1.25 + 1.28 - 0.8) / 3, abs=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3) and m["clip_frac_low"].item() == pytest.approx(1 / 3)
    symmetric, _ = grpo_loss(lp, old, adv, torch.ones(1, 3), eps_low=0.2)
    assert symmetric.item() == pytest.approx(-(1.2 + 1.2 - 0.8) / 3, abs=1e-6)


def test_dapo_overlong_penalty_by_hand():
    """L_max = 10, L_cache = 4: no penalty up to 6 tokens, then -(|y| - 6) / 4, -1 at 10 and past it."""
    from rlhfkit.losses.grpo import overlong_penalty

    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    assert torch.allclose(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert torch.allclose(overlong_penalty(lengths, 10, 4, factor=0.5), torch.tensor([0.0, 0, -0.125, -0.25, -0.5, -0.5]))


def test_a_sample_every_reward_abstained_on_takes_no_part_in_its_group():
    """TRL leaves a NaN reward out of its group's mean and std and gives it advantage 0; scored as
    0 it had moved the baseline: [1, 1, None, 1] gave [0.5, 0.5, -1.5, 0.5], where no sample
    differs from another."""
    nan = float("nan")
    assert group_advantages(torch.tensor([1.0, 1.0, nan, 1.0]), 4).tolist() == [0.0, 0.0, 0.0, 0.0]
    third, std = 1 / 3, (1 / 3) ** 0.5  # present 1, 1, 0: mean 2/3, unbiased std sqrt(1/3)
    expected = torch.tensor([third, third, 0.0, -2 * third]) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 1.0, nan, 0.0]), 4), expected)
    assert group_advantages(torch.tensor([nan, 2.0, nan, nan]), 4).tolist() == [0.0] * 4  # one present: no baseline
    rewards = torch.randn(6 * 5, generator=torch.Generator().manual_seed(0))  # no NaN: the plain formula
    grouped = rewards.view(-1, 5)
    plain = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(group_advantages(rewards, 5), plain, atol=1e-6, rtol=0)


def test_gspo_gives_every_token_its_sequences_ratio_by_hand():
    """GSPO (Zheng et al. 2025, eq. 5 and 7): s_i = exp(mean_t log rho_it), one ratio per answer;
    under the per-sequence mean its loss is -min(s A, clip(s) A) per answer, and the gradient of
    each of its tokens' log-probs is -A s / |o_i| (unclipped)."""
    old = torch.zeros(2, 3)
    delta = torch.tensor([[0.1, -0.3, 0.0], [0.05, 0.05, 0.05]])  # log rho; row 0 has 2 tokens
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    logprobs = (old + delta).requires_grad_(True)
    loss, metrics = grpo_loss(logprobs, old, adv, mask, eps_low=0.2, sequence_ratio=True)
    s0, s1 = math.exp(-0.1), math.exp(0.05)  # mean log rho of each answer's own tokens
    assert loss.item() == pytest.approx((-s0 * 1.0 + s1 * 2.0) / 2, abs=1e-6)  # mean over the 2 answers
    loss.backward()
    expected = torch.tensor([[-1.0 * s0 / 2] * 2 + [0.0], [2.0 * s1 / 3] * 3]) / 2
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-6, rtol=0)
    assert metrics["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * s1) / 5, abs=1e-6)
    clipped, _ = grpo_loss(old + torch.tensor([[0.5, 0.5, 0.0], [0.0] * 3]), old, adv, mask, eps_low=0.2,
                           sequence_ratio=True)  # s0 = e^0.5 > 1.2 with A > 0: clipped at 1.2
    assert clipped.item() == pytest.approx((-1.2 * 1.0 + 1.0 * 2.0) / 2, abs=1e-6)


def test_gspo_token_form_keeps_a_process_rewards_per_token_credit():
    """With one ratio per answer spread over its tokens, per-token advantages [1, 1, -2] gave the
    whole answer a zero gradient; the GSPO-token form (eq. 13) keeps each token's own advantage:
    at ratio 1 the gradient is the per-token one."""
    old = torch.zeros(1, 3)
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3)
    grads = []
    for sequence in (True, False):
        logprobs = old.clone().requires_grad_(True)
        loss, _ = grpo_loss(logprobs, old, adv, mask, sequence_ratio=sequence)
        loss.backward()
        grads.append(logprobs.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], torch.tensor([[-1.0, -1.0, 2.0]]) / 3)


def test_two_sided_clipping_caps_the_ratio_of_negative_advantages_only():
    # log rho = 1 (rho = e) and log rho = ln 1.5 with A = -1, and rho = e with A = +1; eps 0.2, delta 2
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[1.0, math.log(1.5), 1.0]], requires_grad=True)
    advantages = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    losses = []
    for delta in (None, 2.0):
        logprobs.grad = None
        loss, _ = grpo_loss(logprobs, old, advantages, mask, reduction="token_mean", num_tokens=3, delta=delta)
        loss.backward()
        losses.append((loss.item(), logprobs.grad.clone()))
    (plain, g_plain), (capped, g_capped) = losses
    # plain: -min(-e, -1.2) = e, -min(-1.5, -1.2) = 1.5, -min(e, 1.2) = -1.2
    assert abs(plain - (math.e + 1.5 - 1.2) / 3) < 1e-6
    assert torch.allclose(g_plain, torch.tensor([[math.e, 1.5, 0.0]]) / 3, atol=1e-6)
    # capped: -min(-2, -1.2) = 2, with no gradient past the cap; the others as before
    assert abs(capped - (2.0 + 1.5 - 1.2) / 3) < 1e-6
    assert torch.allclose(g_capped, torch.tensor([[0.0, 1.5, 0.0]]) / 3, atol=1e-6)


def test_sampling_weights_by_hand():
    from rlhfkit.losses.grpo import sampling_weights

    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    sampled = torch.tensor([[-1.5, -1.0, float("nan")], [-1.0, -2.0, -3.0]])  # row 0's last: no engine log-prob
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # per token pi_old / pi_sampler: e^0.5, e^-1, 1 (NaN); 1, e^1, (padding) 1
    token = sampling_weights(old, sampled, mask, "token_truncate", None, 2.0)
    assert torch.allclose(token, torch.tensor([[math.exp(0.5), math.exp(-1), 1.0], [1.0, 2.0, 1.0]]))
    masked = sampling_weights(old, sampled, mask, "token_mask", 0.5, 2.0)
    assert torch.allclose(masked, torch.tensor([[math.exp(0.5), 0.0, 1.0], [1.0, 0.0, 1.0]]))
    # per sequence: the product, e^-0.5 and e^1
    seq = sampling_weights(old, sampled, mask, "sequence_mask", None, 2.0)
    assert torch.allclose(seq, torch.tensor([[math.exp(-0.5)], [0.0]]))
    assert torch.allclose(sampling_weights(old, sampled, mask, "sequence_truncate", 0.7, 2.0), torch.tensor([[0.7], [2.0]]))
    # the weights scale the policy term, not the KL term
    lp = torch.zeros(1, 2, requires_grad=True)
    adv, m = torch.ones(1, 2), torch.ones(1, 2)
    plain, _ = grpo_loss(lp, lp.detach(), adv, m, reduction="token_mean", num_tokens=2)
    weighed, stats = grpo_loss(lp, lp.detach(), adv, m, reduction="token_mean", num_tokens=2,
                               sample_weights=torch.tensor([[0.5]]))
    assert abs(weighed.item() - 0.5 * plain.item()) < 1e-7 and abs(stats["sampling_weight_mean"].item() - 0.5) < 1e-7


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    # log rho = 0.5 with A = +1 (rho = 1.65 past the cap 1.2) and log rho = -0.5 with A = -1 (no lower bound)
    logprobs = torch.tensor([[0.5, -0.5]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, stats = grpo_loss(logprobs, old, adv, mask, eps_high=0.2, reduction="token_mean", num_tokens=2, cispo=True)
    loss.backward()
    w = math.exp(-0.5)
    assert abs(loss.item() - (-1.2 * 0.5 - w * 0.5) / 2) < 1e-6  # -sg(min(rho, 1.2)) A log pi, a token mean
    # the gradient is -sg(w) A: the clipped token keeps it (PPO's clip would zero it)
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.2, w]]) / 2, atol=1e-6)
    assert stats["clip_frac_high"].item() == 0.5 and stats["clip_frac_low"].item() == 0.0


def test_sapo_gates_the_ratio_smoothly_by_hand():
    """L = -sigma(tau (r - 1)) 4 / tau A per token, tau 1 where A > 0 and 1.05 elsewhere, a
    per-answer mean: value and gradient d/dlog pi = -sigma'(tau (r - 1)) 4 r A by hand; at r = 1
    the gradient is the plain policy gradient's, -A."""
    old = torch.tensor([[-1.0, -2.0]])
    lp = torch.tensor([[-1.0 + math.log(1.5), -2.0 + math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss, metrics = grpo_loss(lp, old, adv, torch.ones(1, 2), sapo=(1.0, 1.05))
    loss.backward()

    def sig(x):
        return 1 / (1 + math.exp(-x))

    terms = [-sig(1.0 * 0.5) * 4 / 1.0 * 2.0, -sig(1.05 * -0.5) * 4 / 1.05 * -1.0]
    assert abs(loss.item() - sum(terms) / 2) < 1e-6
    grads = [-sig(0.5) * (1 - sig(0.5)) * 4 * 1.5 * 2.0, -sig(-0.525) * (1 - sig(-0.525)) * 4 * 0.5 * -1.0]
    assert torch.allclose(lp.grad, torch.tensor([grads]) / 2, atol=1e-6)
    assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0
    at_one = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    grpo_loss(at_one, old, adv, torch.ones(1, 2), sapo=(1.0, 1.05))[0].backward()
    assert torch.allclose(at_one.grad, -adv / 2, atol=1e-6)


def test_the_unbiased_kl_weighs_k3_by_the_ratio_and_keeps_its_gradient():
    """use_bias_correction_kl: beta r k3 per token; at r = 1 (old = pi, detached) its value is k3's
    and its gradient is k3's plus k3 d log pi: d/dl [e^(l - l_old) k3(l)] = k3 + dk3/dl at l = l_old,
    with dk3/dl = 1 - e^(l_ref - l)."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, metrics = grpo_loss(lp, lp.detach(), torch.zeros(1, 2), torch.ones(1, 2), ref, beta=0.5, kl_ratio=True)
    loss.backward()
    k3 = k3_kl(lp.detach(), ref)
    assert abs(loss.item() - 0.5 * k3.mean().item()) < 1e-6 and abs(metrics["kl"] - k3.mean()) < 1e-6
    expected = 0.5 * (k3 + 1 - torch.exp(ref - lp.detach())) / 2
    assert torch.allclose(lp.grad, expected, atol=1e-6)
    plain = lp.detach().clone().requires_grad_(True)
    grpo_loss(plain, plain.detach(), torch.zeros(1, 2), torch.ones(1, 2), ref, beta=0.5)[0].backward()
    assert (plain.grad - lp.grad).abs().max() > 1e-2  # the paper's k3 alone: another gradient


def test_off_policy_sequence_masking_by_hand():
    """M = 0 for an answer with A < 0 whose mean log(pi_sampler / pi_theta) over its tokens exceeds
    delta; the others, and answers with A >= 0 however far, keep theirs."""
    from rlhfkit.losses.grpo import off_policy_keep

    logprobs = torch.zeros(4, 3)
    sampled = torch.tensor([[0.6, 0.6, 0.0], [0.6, 0.6, 0.0], [0.1, 0.2, 0.0], [0.9, 0.9, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]).float()  # the third token is padding
    adv = torch.tensor([-1.0, 1.0, -1.0, 0.0])[:, None].expand(4, 3)
    keep = off_policy_keep(adv, logprobs, sampled, mask, 0.5)  # drifts 0.6, 0.6, 0.15, 0.9
    assert keep[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_gdpo_normalises_each_reward_in_its_group_before_the_sum():
    """normalize_then_sum: each function's rewards centred and scaled within the group, then summed
    with the weights; a function on a wide scale (0..100) weighs no more than one on 0..1 then.
    NaN (an abstention) stays out of its function's group statistics; every function abstaining
    leaves NaN."""
    import statistics

    from rlhfkit.losses.grpo import decoupled_advantages

    nan = float("nan")
    per_function = torch.tensor([[0.0, 0.0], [1.0, 100.0], [0.0, 50.0], [1.0, 20.0], [nan, nan], [0.0, 10.0]])
    got = decoupled_advantages(per_function, [1.0, 0.5], group_size=3)

    def normalised(values):
        present = [v for v in values if not math.isnan(v)]
        mean, std = statistics.mean(present), statistics.stdev(present)
        return [0.0 if math.isnan(v) else (v - mean) / (std + 1e-4) for v in values]

    first = [a + 0.5 * b for a, b in zip(normalised([0, 1, 0]), normalised([0, 100, 50]))]
    second = [a + 0.5 * b for a, b in zip(normalised([1, nan, 0]), normalised([20, nan, 10]))]
    assert torch.allclose(got[:3], torch.tensor(first), atol=1e-5)
    assert got[3].item() == pytest.approx(second[0], abs=1e-5) and math.isnan(got[4].item())
    assert got[5].item() == pytest.approx(second[2], abs=1e-5)
    summed_first = group_advantages(per_function[:3, 0] + 0.5 * per_function[:3, 1], 3)  # TRL's default order
    assert (summed_first - got[:3]).abs().max() > 0.1


def test_luspo_is_gspo_with_each_answers_term_times_its_length():
    """LUSPO: the sequence ratio s_i = exp(mean_t log rho), clipped as GSPO's, each answer's term
    summed over its tokens and averaged over answers: 1/G sum_i |o_i| L_i, by hand."""
    old = torch.zeros(2, 3)
    lp = torch.tensor([[0.1, 0.3, 0.0], [-0.2, -0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0], [-2.0]]).expand(2, 3)
    loss, _ = grpo_loss(lp, old, adv, mask, reduction="seq_mean_token_sum", sequence_ratio=True, eps_low=0.2)
    s1, s2 = math.exp(0.2), math.exp(-0.1)  # mean log-ratios 0.4/2 and -0.3/3
    l1 = -min(s1 * 1.0, min(max(s1, 0.8), 1.2) * 1.0)
    l2 = -min(s2 * -2.0, min(max(s2, 0.8), 1.2) * -2.0)
    assert abs(loss.item() - (2 * l1 + 3 * l2) / 2) < 1e-6
    dr, _ = grpo_loss(lp, old, adv, mask, reduction="seq_mean_token_sum_norm", sequence_ratio=True, max_tokens=3)
    assert abs(loss.item() - 3 * dr.item()) < 1e-6  # Dr. GRPO's sum over G x max length, times the max length


def test_sapo_at_the_sequence_level_gates_gspos_ratio():
    """importance_sampling_level=sequence with sapo (as TRL): every token carries the answer's
    s = exp(mean_t log rho) in the gate; with GRPO's per-answer mean the loss is -f(s) A an answer."""
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.3, -0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = grpo_loss(lp, old, torch.full((1, 3), 1.5), mask, sapo=(1.0, 1.05), sequence_ratio=True)
    s = math.exp(0.1)
    assert abs(loss.item() - (-(1 / (1 + math.exp(-(s - 1)))) * 4 * 1.5)) < 1e-6
    loss.backward()  # d/dl_t of -f(s) A with s = exp(mean l): -f'(s) s A / 2 on each real token
    sig = 1 / (1 + math.exp(-(s - 1)))
    assert torch.allclose(lp.grad, torch.tensor([[1.0, 1.0, 0.0]]) * -sig * (1 - sig) * 4 * s * 1.5 / 2, atol=1e-6)


def test_the_entropy_bonus_subtracts_the_token_mean_entropy_with_its_gradient():
    """entropy_coef c: L - c 1/N sum H over the real tokens (N the step's tokens), whatever the
    policy term's reduction; d/dH = -c / N on each real token."""
    lp = torch.tensor([[-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    entropy = torch.tensor([[0.5, 1.5, 9.0]], requires_grad=True)
    plain, _ = grpo_loss(lp, lp, adv, mask)
    loss, _ = grpo_loss(lp, lp, adv, mask, num_tokens=4, entropy=entropy, entropy_coef=0.1)
    assert abs(loss.item() - (plain.item() - 0.1 * (0.5 + 1.5) / 4)) < 1e-7
    loss.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.1 / 4, -0.1 / 4, 0.0]]))


def test_vespo_weighs_each_answer_by_a_gamma_of_its_whole_ratio_by_hand():
    """L = -sg(phi(w)) A log pi per token, phi(w) = e^lam w^k e^(-lam w) of the answer's whole ratio
    w = exp(sum_t log rho_t), (k, lam) = (2, 3) where A >= 0 and (3, 2) where A < 0, DAPO's token
    mean; the gradient is -phi A per token (phi without gradient); at w = 1 phi is 1 (the plain
    policy gradient); sampling weights enter w token by token and do not multiply the loss."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    lp = (old + torch.tensor([[0.2, -0.1, 0.0], [-0.3, 0.1, 0.0]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the first answer's third token is padding
    adv = torch.tensor([[1.5], [-0.5]]).expand(2, 3)
    loss, metrics = grpo_loss(lp, old, adv, mask, reduction="token_mean", num_tokens=5.0,
                              vespo=((2.0, 3.0), (3.0, 2.0)))
    loss.backward()

    def phi(log_w, k, lam):
        return math.exp(lam + k * log_w - lam * math.exp(log_w))

    p = [phi(0.1, 2.0, 3.0), phi(-0.2, 3.0, 2.0)]  # log w: 0.2 - 0.1; -0.3 + 0.1 + 0
    values = lp.detach()
    expected = sum(-p[i] * adv[i, t].item() * values[i, t].item() * mask[i, t].item() for i in range(2) for t in range(3))
    assert abs(loss.item() - expected / 5) < 1e-6
    grads = torch.tensor([[-p[0] * 1.5] * 3, [p[1] * 0.5] * 3]) * mask / 5
    assert torch.allclose(lp.grad, grads, atol=1e-6)
    assert abs(metrics["vespo_phi_mean"].item() - (2 * p[0] + 3 * p[1]) / 5) < 1e-6
    assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0
    on_policy = old.clone().requires_grad_(True)
    grpo_loss(on_policy, old, adv, mask, reduction="token_mean", num_tokens=5.0,
              vespo=((2.0, 3.0), (3.0, 2.0)))[0].backward()
    assert torch.allclose(on_policy.grad, -adv * mask / 5, atol=1e-6)  # phi(1) = e^lam e^-lam = 1
    # a token weight pi_old / pi_sampler of 2 on the second answer's last token: log w gains log 2
    weights = torch.ones(2, 3)
    weights[1, 2] = 2.0
    weighted, _ = grpo_loss(lp.detach(), old, adv, mask, reduction="token_mean", num_tokens=5.0,
                            vespo=((2.0, 3.0), (3.0, 2.0)), sample_weights=weights)
    p2 = phi(-0.2 + math.log(2.0), 3.0, 2.0)
    expected = sum(-(p[0] if i == 0 else p2) * adv[i, t].item() * values[i, t].item() * mask[i, t].item()
                   for i in range(2) for t in range(3))
    assert abs(weighted.item() - expected / 5) < 1e-6
    with pytest.raises(ValueError, match="vespo takes the sampling weights token by token"):  # (B, 1): a sequence mode
        grpo_loss(lp.detach(), old, adv, mask, reduction="token_mean", num_tokens=5.0, vespo=((2.0, 3.0), (3.0, 2.0)),
                  sample_weights=torch.ones(2, 1))


def test_vespo_matches_trls_gamma_weights_on_random_answers():
    # TRL 1.16's get_gamma_weights, written out: log w = clamp(sum_t clamp(log rho, -20, 20) mask, log 1e-8, 20),
    # (k, lam) by the advantage's sign (lam clamped at 1e-4), phi = exp(lam + k log w - lam w); the loss -phi A log pi
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 5, generator=gen, dtype=torch.float64) * 3
    lp = old + torch.randn(6, 5, generator=gen, dtype=torch.float64) * 0.3
    mask = (torch.rand(6, 5, generator=gen) > 0.2).double()
    adv = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    log_w = torch.clamp((torch.clamp(lp - old, -20, 20) * mask).sum(-1, keepdim=True), math.log(1e-8), 20)
    k = torch.where(adv >= 0, 2.0, 3.0)
    lam = torch.where(adv >= 0, 3.0, 2.0).clamp(min=1e-4)
    trl_phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    trl = (-trl_phi * adv * lp * mask).sum() / mask.sum()
    mine, _ = grpo_loss(lp, old, adv.expand(6, 5), mask, reduction="token_mean", num_tokens=float(mask.sum()),
                        vespo=((2.0, 3.0), (3.0, 2.0)))
    assert abs(mine.item() - trl.item()) < 1e-12
