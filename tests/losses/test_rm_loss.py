import math

import torch
import torch.nn.functional as F

from rlhfkit.losses.rm import ranking_loss


def _log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_k4_matches_hand_computation():
    r = [2.0, 0.5, 1.0, -1.0]  # best first; the pair (y2, y3) is ranked wrong by the scores
    loss, sums = ranking_loss(torch.tensor([r]), torch.ones(1, 4))
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = -sum(_log_sigmoid(r[i] - r[j]) for i, j in pairs) / 6  # 1/C(4,2) * sum over the 6 pairs
    assert abs(loss.item() - expected) < 1e-6
    assert sums["pairs"].item() == 6 and sums["correct"].item() == 5


def test_k2_is_the_pairwise_loss_and_prompts_average():
    rewards = torch.tensor([[1.5, 0.25], [0.0, 2.0]])
    loss, _ = ranking_loss(rewards, torch.ones(2, 2))
    expected = -(_log_sigmoid(1.25) + _log_sigmoid(-2.0)) / 2
    assert abs(loss.item() - expected) < 1e-6


def test_padding_slots_and_ties_form_no_pairs():
    # Prompt 0 has K=3 (slot 3 is padding); prompt 1 has a tie between its last two outputs.
    rewards = torch.tensor([[1.0, 0.0, -1.0, 9.0], [0.5, 0.2, 0.1, 0.3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ranks = torch.tensor([[0, 1, 2, 4], [0, 1, 2, 2]])
    loss, sums = ranking_loss(rewards, mask, ranks)
    p0 = -(_log_sigmoid(1.0) + _log_sigmoid(2.0) + _log_sigmoid(1.0)) / 3
    p1 = -(_log_sigmoid(0.3) + _log_sigmoid(0.4) + _log_sigmoid(0.2) + _log_sigmoid(0.1) + _log_sigmoid(-0.1)) / 5
    assert abs(loss.item() - (p0 + p1) / 2) < 1e-6
    assert sums["pairs"].item() == 8


def test_gradient_matches_the_written_out_formula():
    r = torch.tensor([[0.3, -0.2, 0.9, 0.1, -1.0]], requires_grad=True)
    loss, _ = ranking_loss(r, torch.ones(1, 5))
    loss.backward()
    r2 = r.detach().clone().requires_grad_(True)
    written = sum(-F.logsigmoid(r2[0, i] - r2[0, j]) for i in range(5) for j in range(i + 1, 5)) / 10
    written.backward()
    assert torch.allclose(r.grad, r2.grad, atol=1e-7)
    # closed form: d/dr_k = 1/C * ( -sum_{j worse} sigma(r_j - r_k) + sum_{i better} sigma(r_k - r_i) )
    k = 2
    s = torch.sigmoid
    closed = (-sum(s(r2[0, j] - r2[0, k]) for j in range(k + 1, 5)) + sum(s(r2[0, k] - r2[0, i]) for i in range(k))) / 10
    assert abs(r.grad[0, k].item() - closed.item()) < 1e-6


def test_center_coef_means_what_trl_center_rewards_coefficient_means_at_k2():
    # TRL adds coef * (r_chosen + r_rejected)^2 per pair; at K = 2 ours is coef * (2 * mean)^2: the same.
    rewards = torch.tensor([[1.5, -0.25], [0.5, 2.0]])
    mask = torch.ones(2, 2)
    plain, _ = ranking_loss(rewards, mask)
    centred, _ = ranking_loss(rewards, mask, center_coef=0.01)
    trl_term = 0.01 * ((1.5 - 0.25) ** 2 + (0.5 + 2.0) ** 2) / 2  # mean over the two pairs
    assert abs((centred - plain).item() - trl_term) < 1e-7


def test_center_coef_at_k3_uses_the_prompt_mean():
    rewards = torch.tensor([[3.0, 0.0, 0.0]])
    plain, _ = ranking_loss(rewards, torch.ones(1, 3))
    centred, _ = ranking_loss(rewards, torch.ones(1, 3), center_coef=0.5)
    assert abs((centred - plain).item() - 0.5 * (2 * 1.0) ** 2) < 1e-6  # mean 1.0


def test_a_pairs_margin_is_subtracted_inside_the_log_sigmoid_with_its_gradient():
    """Llama 2's margin loss: -log sigma(r_w - r_l - m); prompt 2 has no margin (0)."""
    r = torch.tensor([[2.0, 0.5], [0.0, 1.0]], requires_grad=True)
    loss, _ = ranking_loss(r, torch.ones(2, 2), margins=torch.tensor([1.0, 0.0]))
    expected = -(_log_sigmoid(2.0 - 0.5 - 1.0) + _log_sigmoid(0.0 - 1.0)) / 2
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    d = (1 - 1 / (1 + math.exp(-(2.0 - 0.5 - 1.0)))) / 2  # -d/dr_w of -log sigma(x)/2 = (1 - sigma(x))/2
    assert torch.allclose(r.grad[0], torch.tensor([-d, d]), atol=1e-6)


def test_a_pair_tied_in_score_counts_half_right():
    _, sums = ranking_loss(torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3))  # (0,1) tied, (0,2) and (1,2) right
    assert sums["pairs"].item() == 3 and sums["correct"].item() == 2.5
