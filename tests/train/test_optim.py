"""The optimizer step: clipping folded into the fused AdamW step against clip_grad_norm_ then the step."""

import pytest
import torch

from rlhfkit.train.dist import DistInfo
from rlhfkit.train.optim import NonFiniteError, build_optimizer, build_scheduler, optimizer_step


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(folded: bool, max_grad_norm: float, steps: int = 6):
    model = _model()
    optimizer = build_optimizer(model, lr=3e-2, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, steps, 0, "constant")
    if not folded:  # the plain path: clip_grad_norm_, then the step
        optimizer.defaults["fused"] = False
        for group in optimizer.param_groups:  # the same fused kernel, only the clipping differs
            group["fused"] = True
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    norms = []
    for step in range(steps):
        loss = ((model(x) * 5 - y) ** 2).mean()
        loss.backward()
        norms.append(optimizer_step(model, optimizer, scheduler, max_grad_norm, DistInfo(), step))
    assert getattr(optimizer, "grad_scale", None) is None and all(p.grad is None for p in model.parameters())
    return norms, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6, 0.0])  # always clipped, never, no limit
def test_clipping_folded_into_the_fused_step_matches_clip_then_step(max_grad_norm):
    norms, params = _train(True, max_grad_norm)
    plain_norms, plain_params = _train(False, max_grad_norm)
    assert norms == pytest.approx(plain_norms, rel=1e-5) and norms[0] > 0.5  # 0.05 clips every step
    for p, q in zip(params, plain_params):
        assert torch.allclose(p, q, atol=1e-5, rtol=0)
    start = _model()
    moved = sum(float((p - q.detach()).abs().max()) for p, q in zip(params, start.parameters()))
    assert moved > 1e-2


def test_clipping_bounds_the_update_of_the_first_adam_step():
    # the gradients as the fused step reads them (divided by its grad_scale) have the clipped norm
    model = _model()
    optimizer = build_optimizer(model, lr=1e-3)
    seen = []  # (squared norm as the step reads it) per call: one call per parameter group
    original = torch._fused_adamw_

    def spy(params, grads, *args, grad_scale=None, **kw):
        scale = 1.0 if grad_scale is None else float(grad_scale)
        seen.append(sum(float(g.square().sum()) for g in grads) / scale ** 2)
        return original(params, grads, *args, grad_scale=grad_scale, **kw)

    torch._fused_adamw_ = spy
    try:
        ((model(torch.randn(8, 6)) * 5) ** 2).mean().backward()
        norm = optimizer_step(model, optimizer, build_scheduler(optimizer, 1, 0, "constant"), 0.05, DistInfo(), 0)
    finally:
        torch._fused_adamw_ = original
    assert norm > 0.05 and len(seen) == 2 and sum(seen) ** 0.5 == pytest.approx(0.05, rel=1e-4)


def test_a_non_finite_gradient_stops_before_the_step():
    model = _model()
    optimizer = build_optimizer(model, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 6)).sum().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="gradient norm"):
        optimizer_step(model, optimizer, build_scheduler(optimizer, 1, 0, "constant"), 1.0, DistInfo(), 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
