"""Value tests of the sampler's top-k / top-p filter and its inverse-CDF draw."""

import pytest
import torch

from rlhfkit.rollout.sampler import _draw, _filter_logits

PROBS = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
LOGITS = PROBS.log()  # softmax(LOGITS) = PROBS; cumulative 0.5, 0.7, 0.85, 0.95, 1.0


def kept(logits):
    return torch.isfinite(logits).int().tolist()


def test_no_filter_is_identity():
    assert torch.equal(_filter_logits(LOGITS, 0, 1.0), LOGITS)
    assert torch.equal(_filter_logits(LOGITS, 5, 1.0), LOGITS)  # k = vocabulary size: nothing to drop


def test_top_k_keeps_the_k_largest_unchanged():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.9], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = _filter_logits(logits, 2, 1.0)
    assert kept(out) == [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]]  # row 0: 2.0 and 1.5; row 1: 5.0 and 4.0
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([2.0, 1.5, 5.0, 4.0]))
    assert (out[~torch.isfinite(out)] == float("-inf")).all()


def test_top_k_keeps_every_tie_at_the_kth_value():
    # Same convention as transformers' TopKLogitsWarper: drop only logits strictly below the k-th.
    assert kept(_filter_logits(torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]]), 2, 1.0)) == [[1, 0, 1, 0, 1]]


@pytest.mark.parametrize("top_p, expected", [
    (0.3, [1, 0, 0, 0, 0]),  # 0.5 >= 0.3 already
    (0.69, [1, 1, 0, 0, 0]),  # 0.5 < 0.69 <= 0.5 + 0.2
    (0.71, [1, 1, 1, 0, 0]),  # 0.7 < 0.71 <= 0.85
    (0.75, [1, 1, 1, 0, 0]),  # 0.7 < 0.75 <= 0.85
    (0.9, [1, 1, 1, 1, 0]),  # 0.85 < 0.9 <= 0.95
    (0.97, [1, 1, 1, 1, 1]),  # 0.95 < 0.97
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(_filter_logits(LOGITS, 0, top_p)) == [expected]
    shuffled = LOGITS[:, [3, 0, 4, 2, 1]]  # the filter must not depend on the token order
    assert kept(_filter_logits(shuffled, 0, top_p)) == [[expected[i] for i in [3, 0, 4, 2, 1]]]


def test_top_p_exact_boundary_keeps_the_smallest_set():
    dyadic = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()  # exact in float32: cumulative 0.5, 0.75
    assert kept(_filter_logits(dyadic, 0, 0.75)) == [[1, 1, 0, 0]]  # 0.5 + 0.25 = 0.75 reaches 0.75
    assert kept(_filter_logits(dyadic, 0, 0.5)) == [[1, 0, 0, 0]]  # 0.5 reaches 0.5


def test_top_p_with_ties_keeps_the_right_count():
    flat = torch.zeros(1, 4)  # probabilities 0.25 each: 0.25 < 0.4 <= 0.5, so two tokens
    assert sum(kept(_filter_logits(flat, 0, 0.4))[0]) == 2


def test_top_k_then_top_p_on_the_renormalised_rest():
    # top-k 3 leaves 0.5, 0.2, 0.15, renormalised by 0.85: 0.5882, 0.2353, 0.1765 (cumulative
    # 0.5882, 0.8235). top-p 0.8 then keeps two; on the raw probabilities (0.7 < 0.8) it keeps three.
    assert kept(_filter_logits(LOGITS, 0, 0.8)) == [[1, 1, 1, 0, 0]]
    assert kept(_filter_logits(LOGITS, 3, 0.8)) == [[1, 1, 0, 0, 0]]


def test_draw_frequencies_match_probs_and_zero_is_never_drawn():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]).expand(20000, 5)
    tokens = _draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).double() / 20000
    assert torch.allclose(freq, probs[0].double(), atol=0.01)
    assert freq[1] == 0 and freq[4] == 0  # an interior and a trailing zero


def test_draw_is_exact_inverse_cdf_of_unnormalised_weights():
    weights = torch.tensor([[0.0, 2.0, 6.0, 2.0], [1.0, 0.0, 0.0, 3.0]]).repeat(5000, 1)  # sums 10 and 4
    tokens = _draw(weights, torch.Generator().manual_seed(1))
    u = torch.rand(10000, 1, generator=torch.Generator().manual_seed(1)) * weights.sum(-1, keepdim=True)
    expected = (weights.cumsum(-1) <= u).sum(-1)  # the first i with cumsum_i > u
    assert torch.equal(tokens, expected)
    freq = torch.bincount(tokens[0::2], minlength=4).double() / 5000  # row 0: 0, 0.2, 0.6, 0.2
    assert freq[0] == 0 and torch.allclose(freq, torch.tensor([0.0, 0.2, 0.6, 0.2], dtype=freq.dtype), atol=0.02)
    assert set(tokens[1::2].tolist()) <= {0, 3}  # row 1: tokens 1 and 2 have weight 0
