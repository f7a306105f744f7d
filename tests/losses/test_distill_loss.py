"""On-policy distillation's divergence (losses/distill.py) against hand-computed values and the
closed-form gradients of its docstring."""

import math

import pytest
import torch

from rlhfkit.losses import distill
from rlhfkit.losses.distill import distill_loss, generalized_jsd


def probs(logits, temperature=1.0):
    z = [x / temperature for x in logits]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


S, T = [1.0, 0.0, -1.0, 0.5], [0.2, 1.5, -0.3, 0.0]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_divergence_is_the_papers_by_hand(beta, temperature):
    ps, pt = probs(S, temperature), probs(T, temperature)
    if beta == 0.0:
        want = kl(pt, ps)  # forward KL(teacher || student)
    elif beta == 1.0:
        want = kl(ps, pt)  # reverse KL(student || teacher)
    else:
        m = [(1 - beta) * a + beta * b for a, b in zip(ps, pt)]
        want = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    got = generalized_jsd(torch.tensor([S], dtype=torch.float64), torch.tensor([T], dtype=torch.float64), beta,
                          temperature)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_jsd_at_one_half_is_symmetric_and_at_most_log_2():
    s, t = torch.randn(5, 7, dtype=torch.float64) * 3, torch.randn(5, 7, dtype=torch.float64) * 3
    one, other = generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5)
    assert torch.allclose(one, other, atol=1e-12)
    assert bool((one <= math.log(2) + 1e-12).all()) and bool((one >= 0).all())
    assert torch.allclose(generalized_jsd(s, s, 0.5), torch.zeros(5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradients_are_the_closed_forms(beta):
    torch.manual_seed(0)
    temperature = 1.5
    zs = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    zt = torch.randn(3, 6, dtype=torch.float64) * 2
    generalized_jsd(zs, zt, beta, temperature).sum().backward()
    log_s, log_t = (zs.detach() / temperature).log_softmax(-1), (zt / temperature).log_softmax(-1)
    ps, pt = log_s.exp(), log_t.exp()
    if beta == 0.0:
        want = ps - pt
    elif beta == 1.0:
        kl_s = (ps * (log_s - log_t)).sum(-1, keepdim=True)
        want = ps * (log_s - log_t - kl_s)
    else:
        log_m = ((1 - beta) * ps + beta * pt).log()
        kl_m = (ps * (log_s - log_m)).sum(-1, keepdim=True)
        want = (1 - beta) * ps * (log_s - log_m - kl_m)
    assert torch.allclose(zs.grad, want / temperature, atol=1e-12)


def test_a_token_the_teacher_rules_out_adds_nothing_to_the_forward_kl():
    """-inf logits (a model that rules a token out): 0 log 0 is 0, not NaN."""
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[0.0, float("-inf"), 2.0]])
    a, b = probs([0.0, 2.0])  # the teacher's mass on tokens 0 and 2
    want = kl([a, 0.0, b], probs([0.0, 1.0, 2.0]))
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(want, rel=1e-6)
    assert math.isfinite(generalized_jsd(s, t, 0.5).item())
    assert generalized_jsd(s, t, 1.0).item() == math.inf  # the student puts mass where the teacher has none


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_the_chunked_loss_has_autograds_values_and_gradients(beta):
    """distill_loss, 2 rows at a time with its closed-form backward, against autograd through
    generalized_jsd on all 7 rows at once; a token the teacher rules out included (beta 0: the
    forward KL stays finite)."""
    torch.manual_seed(1)
    zs, zt = torch.randn(7, 11) * 3, torch.randn(7, 11) * 3
    if beta == 0.0:
        zt[2, 4] = float("-inf")
    weights = torch.rand(7)  # a downstream weighting, so that each row's incoming gradient differs

    def grads(fn):
        x = zs.clone().requires_grad_()
        value = fn(x)
        (value * weights).sum().backward() if value.dim() else value.backward()
        return value.detach(), x.grad

    plain, plain_grad = grads(lambda x: generalized_jsd(x, zt, beta, 1.5))
    chunked, chunked_grad = grads(lambda x: distill._ChunkedDivergence.apply(x, zt, beta, 1.5, 2)[0])
    assert torch.allclose(chunked, plain, atol=1e-6) and bool(plain.isfinite().all())
    assert torch.allclose(chunked_grad, plain_grad, atol=1e-6) and plain_grad.abs().max() > 1e-3
    loss, sums = distill_loss(zs, zt, beta, 1.5, num_tokens=10, rows=3)
    assert loss.item() == pytest.approx(plain.sum().item() / 10, rel=1e-6)
    assert sums["divergence"].item() == pytest.approx(plain.sum().item(), rel=1e-6)


def test_the_loss_is_the_tokens_sum_over_the_steps_tokens_with_entropies():
    s, t = torch.tensor([S, T]), torch.tensor([T, T])
    loss, sums = distill_loss(s, t, 1.0, 1.0, num_tokens=8)
    each = [kl(probs(S), probs(T)), 0.0]
    assert loss.item() == pytest.approx(sum(each) / 8, rel=1e-5)
    assert sums["divergence"].item() == pytest.approx(sum(each), rel=1e-5)
    entropy = lambda p: -sum(a * math.log(a) for a in p)  # noqa: E731
    assert sums["entropy"].item() == pytest.approx(entropy(probs(S)) + entropy(probs(T)), rel=1e-5)
    assert sums["teacher_entropy"].item() == pytest.approx(2 * entropy(probs(T)), rel=1e-5)
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        distill_loss(s, t, -0.1, 1.0, num_tokens=2)
