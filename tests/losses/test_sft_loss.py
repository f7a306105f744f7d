import math

import pytest
import torch

from rlhfkit.losses.reduce import token_mean
from rlhfkit.losses.sft import sft_loss


def test_sft_loss_matches_hand_computation():
    # Two sequences; mask picks 3 completion targets in total.
    logprobs = torch.tensor([[0.0, -0.5, -1.0, -2.0], [0.0, -0.25, -3.0, -4.0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    loss, metrics = sft_loss(logprobs, mask)
    expected = (1.0 + 2.0 + 3.0) / 3  # mean over all completion tokens of the batch, not per sequence
    assert abs(loss.item() - expected) < 1e-6
    assert metrics["tokens"].item() == 3


def test_sft_loss_from_logits_by_hand():
    # vocab 2, one target: logits (1, 2) -> log p(token 1) = 2 - log(e^0 + e^2)
    logits = torch.tensor([[0.0, 2.0]])
    logprob = logits.log_softmax(-1)[0, 1]
    loss, _ = sft_loss(logprob.view(1, 1), torch.ones(1, 1))
    assert abs(loss.item() - (math.log(1 + math.e**2) - 2.0)) < 1e-6


def test_prompt_tokens_get_no_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    loss, _ = sft_loss(logprobs, mask)
    loss.backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert torch.all(logits.grad[mask == 1].abs().sum(-1) > 0)


def test_global_token_count_makes_split_batches_add_up():
    # Splitting a batch in two "ranks" with the global count passed in gives the global mean.
    values = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    whole = token_mean(values, mask)
    n = mask.sum().item()
    parts = token_mean(values[:2], mask[:2], n) + token_mean(values[2:], mask[2:], n)
    assert torch.allclose(whole, parts, atol=1e-6)


def test_all_masked_batch_gives_connected_zero():
    logprobs = torch.randn(2, 3, requires_grad=True)
    loss, _ = sft_loss(logprobs, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logprobs.grad == 0)


def test_dft_weighs_each_tokens_nll_by_its_probability_held_constant():
    """DFT (Wu et al. 2025; TRL's loss_type="dft"): -1/N sum sg(p) log p; its gradient with
    respect to log p is -sg(p) / N, not the NLL's -1 / N."""
    logprobs = torch.tensor([[0.0, -0.5, -1.0, -2.0], [0.0, -0.25, -3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    loss, metrics = sft_loss(logprobs, mask, form="dft")
    p = [math.exp(-1.0), math.exp(-2.0), math.exp(-3.0)]
    assert loss.item() == pytest.approx((p[0] * 1.0 + p[1] * 2.0 + p[2] * 3.0) / 3, abs=1e-7)
    assert metrics["nll_sum"].item() == pytest.approx(6.0)  # the plain NLL, as with nll
    loss.backward()
    expected = torch.zeros(2, 4)
    expected[0, 2], expected[0, 3], expected[1, 2] = -p[0] / 3, -p[1] / 3, -p[2] / 3
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-7, rtol=0)
