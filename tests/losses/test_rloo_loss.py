"""RLOO (losses/grpo.py): the leave-one-out advantages and TRL's loss on the answer's whole ratio,
against hand-computed values and closed-form gradients."""

import math

import torch

from rlhfkit.losses.grpo import grpo_loss, loo_advantages, sequence_k1


def test_loo_advantages_by_hand():
    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,  # S = 2: r_i - (2 - r_i) / 3
                            2.0, 2.0, 2.0, 2.0,  # all equal: exactly 0
                            3.0, nan, 1.0, 2.0,  # three scored: r_i - (6 - r_i) / 2; the abstained one 0
                            nan, 5.0, nan, nan])  # one scored: no baseline, 0
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 1.5, 0, -1.5, 0, 0, 0, 0, 0]
    assert torch.allclose(loo_advantages(rewards, 4), torch.tensor(expected), atol=1e-7)
    # k / (k - 1) times the centred reward, the form veRL writes
    r = torch.randn(12)
    centred = r.view(-1, 6) - r.view(-1, 6).mean(-1, keepdim=True)
    assert torch.allclose(loo_advantages(r, 6), (6 / 5 * centred).flatten(), atol=1e-6)
    # a group of seven 0.7s is exactly 0 (its float32 mean is not 0.7)
    assert loo_advantages(torch.full((7,), 0.7), 7).abs().max() == 0


def test_sequence_k1_sums_the_log_ratio_over_the_answers_tokens():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -0.25, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.allclose(sequence_k1(lp, ref, mask), torch.tensor([0.5 - 1.0 + 0.0, 0.5 - 0.25]))


def _trl_rloo_loss(lp, old, adv, mask, eps):  # TRL's RLOOTrainer loss, written from its formula
    s = torch.exp(((lp - old) * mask).sum(-1))
    return -torch.min(s * adv, s.clamp(1 - eps, 1 + eps) * adv).mean()


def test_the_rloo_loss_is_the_clipped_whole_ratio_a_mean_over_answers():
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    old = -torch.rand(3, 4) - 0.5
    # answer 0 inside the band, answer 1 above it with A > 0 (clipped), answer 2 below it with A < 0 (clipped)
    shift = torch.tensor([[0.02, -0.03, 0.04, 0.0], [0.2, 0.1, 0.0, 0.0], [-0.1, -0.1, -0.05, -0.05]])
    adv = torch.tensor([-0.7, 1.3, -0.4])
    for_ours, for_trl = ((old + shift).clone().requires_grad_(True) for _ in range(2))
    loss, metrics = grpo_loss(for_ours, old, adv[:, None].expand(-1, 4), mask, eps_low=0.2,
                              reduction="seq_mean_token_mean", sequence_ratio="total")
    reference = _trl_rloo_loss(for_trl, old, adv, mask, 0.2)
    assert abs(loss.item() - reference.item()) < 1e-6
    loss.backward()
    reference.backward()
    assert torch.allclose(for_ours.grad, for_trl.grad, atol=1e-6)
    # the clipped answers have no gradient; answer 0's is -s A on each of its tokens, / 3 answers
    s0 = math.exp(0.02 - 0.03 + 0.04)
    assert torch.allclose(for_ours.grad[0], torch.tensor([0.7 * s0 / 3] * 3 + [0.0]), atol=1e-6)
    assert for_ours.grad[1:].abs().max() == 0
    assert abs(metrics["clip_frac_high"].item() - 2 / 9) < 1e-7  # token shares
    assert abs(metrics["clip_frac_low"].item() - 4 / 9) < 1e-7


def test_at_ratio_one_the_rloo_loss_has_reinforces_gradient():
    """mu = 1: pi_old is the policy, s_i = 1, and the gradient is -1/G sum_i A_i grad log pi(o_i|q),
    the paper's estimator: each answer's tokens weigh A_i / G, whatever its length."""
    torch.manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp = (-torch.rand(2, 3)).requires_grad_(True)
    adv = torch.tensor([0.9, -0.9])
    loss, _ = grpo_loss(lp, lp.detach(), adv[:, None].expand(-1, 3), mask, reduction="seq_mean_token_mean",
                        sequence_ratio="total")
    loss.backward()
    assert abs(loss.item() + adv.mean().item()) < 1e-7  # -mean(A): 0 for a whole group's LOO advantages
    assert torch.allclose(lp.grad, -adv[:, None] / 2 * mask, atol=1e-7)


def test_the_unbiased_kl_takes_the_policy_terms_ratio():
    """use_bias_correction_kl with the whole-answer ratio: each token's k3 times exp(sum_t log rho),
    the ratio the policy term reads (GSPO's geometric mean for importance_sampling_level=sequence)."""
    from rlhfkit.losses.grpo import k3_kl

    lp = torch.tensor([[-1.0, -1.2, -0.8]])
    old = torch.tensor([[-1.1, -1.25, -0.85]])  # sum of log rho = 0.2
    ref = torch.tensor([[-0.9, -1.5, -0.7]])
    mask = torch.ones(1, 3)
    adv = torch.zeros(1, 3)  # the policy term is 0: the loss is the KL term alone
    for ratio, form in ((math.exp(0.2), "total"), (math.exp(0.2 / 3), True)):
        loss, _ = grpo_loss(lp, old, adv, mask, ref, beta=1.0, reduction="seq_mean_token_mean",
                            sequence_ratio=form, kl_ratio=True)
        assert abs(loss.item() - ratio * k3_kl(lp, ref).mean().item()) < 1e-6
