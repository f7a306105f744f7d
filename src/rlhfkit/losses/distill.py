"""On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes", GKD, eq. 2-3; TRL's DistillationTrainer): the student matches the
teacher's next-token distribution at every token of answers the student sampled itself.

With p_s and p_t the student's and the teacher's next-token distributions at one position, both
softmax(logits / T), and the mixture m = (1 - beta) p_s + beta p_t, the generalized Jensen-Shannon
divergence is

    JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m)        0 < beta < 1

and its two ends are the KLs themselves (TRL's convention, the paper's named cases): beta = 0 is
the forward KL(p_t || p_s) (mode covering, what supervised distillation minimises) and beta = 1 the
reverse KL(p_s || p_t) (mode seeking; TRL's default). (As beta -> 0, JSD(beta) / beta -> the forward
KL: the ends are the limits' directions, not their scale.) The loss is the mean over the step's
answer tokens:

    L = sum over answer tokens i of D_beta(p_s,i, p_t,i) / (the step's answer tokens)

The gradient reaches the student's logits z_s only (the teacher has none): with
KL_s = KL(p_s || .) of the token,

    forward KL:  dL/dz_s = (p_s - p_t) / T
    reverse KL:  dL/dz_s = p_s (log p_s - log p_t - KL(p_s || p_t)) / T
    JSD(beta):   dL/dz_s = (1 - beta) p_s (log p_s - log m - KL(p_s || m)) / T

(the beta KL(p_t || m) term's gradient through m cancels against the other's: d/dz of
sum_v (beta p_t + (1 - beta) p_s) log m = 0, since that sum is the mixture's own mass.)
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable


def _kl(log_p: torch.Tensor, log_q) -> torch.Tensor:
    """KL(p || q) of each row, 0 where p_v is 0 (a token the model rules out: -inf logits). (...,)
    ``log_q`` 0: minus the entropy of p."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T), in fp32 at least (bf16 logits are promoted, fp64 kept)."""
    return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """D_beta(p_s, p_t) of each row of (..., V) logits, the distributions softmax(logits / T). (...)

    beta 0: forward KL(p_t || p_s); 1: reverse KL(p_s || p_t); between: the generalized JSD."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    return _divergence(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature), beta)


def _log_mixture(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """log m, m = (1 - beta) p_s + beta p_t (0 < beta < 1)."""
    return torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))


def _divergence(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """``generalized_jsd`` of the two distributions' log-probs."""
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mixture(log_s, log_t, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _chunk_rows(vocab: int) -> int:
    """Rows of (rows, V) fp32 temporaries of about 2^23 elements (32 MB) at a time."""
    return max(1, 2**23 // max(vocab, 1))


class _ChunkedDivergence(torch.autograd.Function):
    """``generalized_jsd`` of (N, V) fp32 logits and the two entropies, ``rows`` rows at a time:
    it keeps the two logits tensors for the backward and no (N, V) temporaries, where autograd
    through ``generalized_jsd`` keeps about 6 of them (the JSD; 3 for the reverse KL); the
    backward computes the docstring's closed-form gradients chunk by chunk."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, beta: float, temperature: float, rows: int):
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.beta, ctx.temperature, ctx.rows = beta, temperature, rows
        n = student_logits.shape[0]
        divergence, entropy, teacher_entropy = (student_logits.new_empty(n) for _ in range(3))  # fp32, or fp64
        for i in range(0, n, rows):  # each chunk's log-probs once, for the divergence and the entropies
            log_s = _log_probs(student_logits[i: i + rows], temperature)
            log_t = _log_probs(teacher_logits[i: i + rows], temperature)
            divergence[i: i + rows] = _divergence(log_s, log_t, beta)
            entropy[i: i + rows], teacher_entropy[i: i + rows] = -_kl(log_s, 0.0), -_kl(log_t, 0.0)
        ctx.mark_non_differentiable(entropy, teacher_entropy)
        return divergence, entropy, teacher_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_divergence, *_):
        student_logits, teacher_logits = ctx.saved_tensors
        beta, temperature = ctx.beta, ctx.temperature
        grad = torch.empty_like(student_logits)
        for i in range(0, student_logits.shape[0], ctx.rows):
            log_s = _log_probs(student_logits[i: i + ctx.rows], temperature)
            log_t = _log_probs(teacher_logits[i: i + ctx.rows], temperature)
            p_s = log_s.exp()
            if beta == 0.0:
                g = p_s - log_t.exp()
            else:
                other = log_t if beta == 1.0 else _log_mixture(log_s, log_t, beta)
                gap = torch.where(p_s > 0, log_s - other, torch.zeros_like(p_s))  # log p_s - log (p_t or m)
                scale = 1.0 if beta == 1.0 else 1 - beta  # the reverse KL's, or the JSD's (1 - beta)
                g = scale * p_s * (gap - (p_s * gap).sum(-1, keepdim=True))
            grad[i: i + ctx.rows] = g * (grad_divergence[i: i + ctx.rows, None] / temperature)
        return grad, None, None, None, None


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float,
                 num_tokens: float, rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """(N, V) logits at N answer tokens (the positions that predict them; the teacher's without
    gradient). Returns (loss, sums): the loss is the tokens' divergences summed over ``num_tokens``
    (the step's answer tokens on every rank: its micro-batches' losses add up to the step's mean);
    ``sums`` holds detached sums over the N tokens of the divergence, the student's entropy and
    the teacher's. Computed ``rows`` tokens at a time (default: about 32 MB of fp32 a temporary),
    with the closed-form gradient (``_ChunkedDivergence``): the same values and gradients as
    autograd through ``generalized_jsd``, in a fraction of its memory."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    student, teacher = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (student_logits, teacher_logits))
    divergence, entropy, teacher_entropy = _ChunkedDivergence.apply(
        student, teacher.detach(), beta, temperature, rows or _chunk_rows(student.shape[-1]))
    sums = {"divergence": divergence.detach().sum(), "entropy": entropy.sum(), "teacher_entropy": teacher_entropy.sum()}
    return divergence.sum() / num_tokens, sums
