import math

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.losses.prm import step_bce_loss, step_logit


def test_step_bce_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0])
    loss, sums = step_bce_loss(logits, labels)
    # -log sigma(2) = log(1 + e^-2); -log(1 - sigma(-1)) = log(1 + e^-1); -log(1 - sigma(0.5)) = log(1 + e^0.5)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # 0.471423
    assert expected == pytest.approx(0.471422, abs=1e-6)
    assert sums["correct"].item() == 2  # 2 > 0 right, -1 < 0 right, 0.5 > 0 judged right but wrong
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  d/ds_j = (sigma(s_j) - y_j) / N
    assert logits.grad.tolist() == pytest.approx([(sig(2.0) - 1) / 3, sig(-1.0) / 3, sig(0.5) / 3], abs=1e-6)


def test_global_step_count_makes_micro_batches_add_up():
    torch.manual_seed(0)
    logits, labels = torch.randn(7), (torch.rand(7) > 0.5).float()
    whole, _ = step_bce_loss(logits, labels)
    parts = step_bce_loss(logits[:3], labels[:3], num_steps=7)[0] + step_bce_loss(logits[3:], labels[3:], num_steps=7)[0]
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_two_class_head_is_the_same_loss_as_cross_entropy():
    torch.manual_seed(0)
    two = torch.randn(5, 2)
    labels = torch.tensor([1, 0, 1, 1, 0])
    loss, _ = step_bce_loss(step_logit(two), labels.float())
    assert loss.item() == pytest.approx(F.cross_entropy(two, labels).item(), abs=1e-6)
    assert step_logit(torch.tensor([[0.5]])).tolist() == [0.5]
    with pytest.raises(ValueError, match="1 or 2 outputs"):
        step_logit(torch.zeros(2, 3))
