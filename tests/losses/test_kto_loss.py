"""KTO (losses/kto.py) against hand-computed values and closed-form gradients."""

import math

import torch

from rlhfkit.losses.kto import kto_loss, reference_point, weights_advice


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    logps = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
    ref = torch.tensor([-3.5, -4.0, -4.0])
    desirable = torch.tensor([True, False, True])
    beta, z0, wd, wu = 0.5, 0.2, 1.5, 0.8
    loss, sums = kto_loss(logps, ref, desirable, z0, beta, wd, wu)
    r = [0.5, -1.0, 0.0]
    terms = [wd * (1 - sig(beta * (r[0] - z0))), wu * (1 - sig(beta * (z0 - r[1]))), wd * (1 - sig(beta * (r[2] - z0)))]
    assert abs(loss.item() - sum(terms) / 3) < 1e-6
    loss.backward()
    # d/dr of w (1 - sigma(beta (r - z))) is -w beta sigma'(.), of w (1 - sigma(beta (z - r))) is +w beta sigma'(.)
    slope = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    expected = [-wd * beta * slope(beta * (r[0] - z0)) / 3, wu * beta * slope(beta * (z0 - r[1])) / 3,
                -wd * beta * slope(beta * (r[2] - z0)) / 3]
    assert torch.allclose(logps.grad, torch.tensor(expected), atol=1e-6)
    assert abs(sums["rewards_chosen"].item() - beta * (0.5 + 0.0)) < 1e-6
    assert abs(sums["rewards_rejected"].item() - beta * -1.0) < 1e-6
    assert abs(sums["logps_chosen"].item() + 7.0) < 1e-6 and abs(sums["logps_rejected"].item() + 5.0) < 1e-6
    # over a step's count (another micro-batch holds the rest): the sum over this one's examples / 6
    half, _ = kto_loss(logps.detach(), ref, desirable, z0, beta, wd, wu, num_examples=6)
    assert abs(half.item() - sum(terms) / 6) < 1e-6


def test_apo_zero_unpaired_anchors_at_zero():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    loss, _ = kto_loss(logps, ref, torch.tensor([True, False]), reference_point=5.0, beta=0.1,
                       loss_type="apo_zero_unpaired")
    assert abs(loss.item() - ((1 - sig(0.1)) + sig(-0.1)) / 2) < 1e-6  # z_0 is not read


def test_bco_is_each_answers_cross_entropy_against_the_reward_shift_by_hand():
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -1.0])  # r = 1 (desirable), -1 (undesirable); beta 0.5, delta 0.1
    loss, _ = kto_loss(logps, ref, torch.tensor([True, False]), reference_point=0.1, beta=0.5,
                       desirable_weight=1.5, loss_type="bco")
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigma(x) = softplus(-x)
    assert abs(loss.item() - (1.5 * softplus(-(0.5 - 0.1)) + softplus(-0.5 - 0.1)) / 2) < 1e-6
    loss.backward()  # d/dr: -w beta sigma(-(beta r - delta)) for a desirable answer, +beta sigma(beta r - delta) else
    expected = [-1.5 * 0.5 * sig(-0.4) / 2, 0.5 * sig(-0.6) / 2]
    assert torch.allclose(logps.grad, torch.tensor(expected), atol=1e-6)


def test_the_reference_point_is_the_mean_clamped_at_zero():
    assert reference_point(3.0, 4.0) == 0.75
    assert reference_point(-3.0, 4.0) == 0.0
    assert reference_point(0.0, 0.0) == 0.0


def test_weights_advice_follows_the_paper_and_trls_ranges():
    assert weights_advice(100, 100, 1.0, 1.0) is None  # ratio 1
    assert weights_advice(120, 100, 1.0, 1.0) is None  # 1.2, inside [1, 4/3]
    advice = weights_advice(50, 100, 1.0, 1.0)  # 0.5: desirable_weight should be in [2, 2.667]
    assert "0.5" in advice and "[2, 2.67]" in advice
    assert weights_advice(50, 100, 2.0, 1.0) is None
    assert weights_advice(0, 100, 1.0, 1.0) is None  # one kind only: nothing to balance
