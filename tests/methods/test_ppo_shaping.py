"""Value tests of PPO's score shaping: scale, missing-EOS penalty, whitening, clipping."""

import math

import pytest
import torch

from rlhfkit.methods.ppo import PPOConfig, shape_scores

RAW = torch.tensor([1.0, -2.0, 3.0, 0.0])
FINISHED = torch.tensor([True, False, True, False])


def shaped(**fields):
    return shape_scores(RAW, FINISHED, PPOConfig(**fields))


def test_defaults_leave_scores_alone():
    assert torch.equal(shaped(), RAW)


def test_score_scale():
    assert torch.allclose(shaped(score_scale=2.0), torch.tensor([2.0, -4.0, 6.0, 0.0]), atol=1e-6, rtol=0)


def test_missing_eos_penalty_on_unfinished_rows_only():
    # rows 1 and 3 have no EOS: -2 - 1.5 = -3.5, 0 - 1.5 = -1.5; rows 0 and 2 unchanged
    expected = torch.tensor([1.0, -3.5, 3.0, -1.5])
    assert torch.allclose(shaped(missing_eos_penalty=1.5), expected, atol=1e-6, rtol=0)
    # the penalty is not scaled: 2 * -2 - 1.5 = -5.5
    got = shaped(score_scale=2.0, missing_eos_penalty=1.5)
    assert torch.allclose(got, torch.tensor([2.0, -5.5, 6.0, -1.5]), atol=1e-6, rtol=0)


def test_whitening():
    # mean (1 - 2 + 3 + 0) / 4 = 0.5; deviations 0.5, -2.5, 2.5, -0.5; squares sum 0.25 + 6.25 + 6.25 + 0.25
    # = 13; unbiased variance 13 / 3; std sqrt(13 / 3) = 2.0816660
    std = math.sqrt(13 / 3)
    expected = torch.tensor([0.5, -2.5, 2.5, -0.5]) / std  # 0.2401922, -1.2009612, 1.2009612, -0.2401922
    got = shaped(whiten_scores=True)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert abs(got.mean().item()) < 1e-6 and got.std().item() == pytest.approx(1.0, abs=1e-6)


def test_whitening_over_ranks_uses_every_ranks_scores():
    """Two ranks holding two scores each whiten as one process holding all four: rank 0's half,
    with ``total`` adding rank 1's partial sums (its count; its sum and count, then its squared
    deviations)."""
    other = shaped(whiten_scores=False)[2:]
    mean = {}

    def total(sums):  # what the all-reduce gives rank 0
        if sums.dtype == torch.float64:  # the number of scores
            return sums + 2
        if sums.numel() == 2:
            out = sums + torch.stack([other.sum(), torch.tensor(2.0)])
            mean["value"] = out[0] / out[1]
            return out
        return sums + ((other - mean["value"]) ** 2).sum()

    half = shape_scores(RAW[:2], FINISHED[:2], PPOConfig(whiten_scores=True), total=total)
    assert torch.allclose(half, shaped(whiten_scores=True)[:2], atol=1e-6, rtol=0)
    assert not torch.allclose(half, shape_scores(RAW[:2], FINISHED[:2], PPOConfig(whiten_scores=True)), atol=1e-2)


def test_whitening_skips_a_single_score():
    one = torch.tensor([3.0]), torch.tensor([True])
    assert torch.equal(shape_scores(*one, PPOConfig(whiten_scores=True)), torch.tensor([3.0]))
    assert torch.equal(shape_scores(*one, PPOConfig(whiten_scores=True), total=lambda sums: sums), torch.tensor([3.0]))


def test_clipping():
    assert torch.allclose(shaped(score_clip=1.5), torch.tensor([1.0, -1.5, 1.5, 0.0]), atol=1e-6, rtol=0)


def test_all_steps_in_order_scale_penalty_whiten_clip():
    # scale 2: 2, -4, 6, 0; penalty 1.5 on rows 1, 3: 2, -5.5, 6, -1.5; mean 1 / 4 = 0.25;
    # deviations 1.75, -5.75, 5.75, -1.75; squares sum 2 * 3.0625 + 2 * 33.0625 = 72.25 = 8.5 ** 2;
    # unbiased std 8.5 / sqrt(3) = 4.9074770; whitened 0.3565991, -1.1716829, 1.1716829, -0.3565991;
    # clipped to [-1, 1]
    w = 1.75 * math.sqrt(3) / 8.5
    expected = torch.tensor([w, -1.0, 1.0, -w])
    got = shaped(score_scale=2.0, missing_eos_penalty=1.5, whiten_scores=True, score_clip=1.0)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
