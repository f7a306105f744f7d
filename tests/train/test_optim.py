"""The optimizer step every method calls: the gradients AdamW reads are clipped, and a non-finite
norm stops before the step."""

import pytest
import torch

from rlhfkit.train.dist import DistInfo
from rlhfkit.train.optim import (
    NonFiniteError,
    _grad_norm,
    build_optimizer,
    build_scheduler,
    optimizer_step,
    total_norm,
)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_adamw_reads_the_clipped_gradients(monkeypatch):
    # the gradients as the fused AdamW kernel reads them have the clipped norm; the returned norm is the unclipped one
    model = _model()
    optimizer = build_optimizer(model, lr=1e-3)
    seen = []  # (squared norm as the step reads it) per call: one call per parameter group
    original = torch._fused_adamw_

    def spy(params, grads, *args, grad_scale=None, **kw):
        scale = 1.0 if grad_scale is None else float(grad_scale)
        seen.append(sum(float(g.square().sum()) for g in grads) / scale ** 2)
        return original(params, grads, *args, grad_scale=grad_scale, **kw)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    ((model(torch.randn(8, 6)) * 5) ** 2).mean().backward()
    norm = optimizer_step(model, optimizer, build_scheduler(optimizer, 1, 0, "constant"), 0.05, DistInfo(), 0)
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


@pytest.mark.parametrize("limit", [0.05, 1e3])  # clipped every step, and never
@pytest.mark.parametrize("apart", [False, True])
def test_steps_match_torchs_clip_then_step(limit, apart):
    # clipping folded into the fused step (or skipped where the factor is 1) gives torch's parameters
    ours, theirs = _model(), _model()
    opt_ours, opt_theirs = build_optimizer(ours, lr=1e-2), build_optimizer(theirs, lr=1e-2)
    schedule = build_scheduler(opt_ours, 3, 0, "constant")
    for step in range(3):
        x = torch.randn(8, 6)
        for model in (ours, theirs):
            ((model(x) * 5) ** 2).mean().backward()
        parts = [ours[0], ours[2]] if apart else None
        norm = optimizer_step(ours, opt_ours, schedule, limit, DistInfo(), step, clip_apart=parts)
        groups = [theirs[0], theirs[2]] if apart else [theirs]
        want = [float(torch.nn.utils.clip_grad_norm_(g.parameters(), limit)) for g in groups][0]
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        assert norm == pytest.approx(want, rel=1e-6)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_total_norm_is_torchs_to_float32_rounding():
    # one dot product per gradient (a transposed view, a scalar, a large one, bf16 by vector_norm) = get_total_norm
    torch.manual_seed(0)
    grads = [torch.randn(64, 48).t(), torch.randn(()), torch.randn(300_001) * 1e-3, torch.randn(7)]
    want = torch.nn.utils.get_total_norm(grads)
    assert total_norm(grads).dtype == torch.float32
    assert float(total_norm(grads)) == pytest.approx(float(want), rel=1e-6)
    assert float(total_norm([g.double() for g in grads])) == pytest.approx(float(want), rel=1e-6)
    half = [g.bfloat16() for g in grads]
    assert float(total_norm(half)) == pytest.approx(float(torch.nn.utils.get_total_norm([g.float() for g in half])), rel=1e-6)
    assert float(total_norm([])) == 0.0
    # not finite where torch's is not: squares past float32's range, a NaN (optimizer_step then stops)
    for bad in ([torch.full((3,), 3e19), torch.ones(2)], [torch.tensor([1.0, float("nan")])]):
        assert not torch.isfinite(torch.nn.utils.get_total_norm(bad)) and not torch.isfinite(total_norm(bad))


def test_dot_products_only_for_plain_cpu_gradients(monkeypatch):
    # elsewhere torch's own norm: its fused foreach kernels on an accelerator, DTensors under FSDP2
    import rlhfkit.train.optim as optim

    calls = []
    monkeypatch.setattr(optim, "total_norm", lambda grads: calls.append("dot") or torch.tensor(1.0))
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads: calls.append("torch") or torch.tensor(1.0))
    cpu = [torch.ones(3)]
    _grad_norm(cpu, sharded=False)
    _grad_norm(cpu, sharded=True)
    _grad_norm(cpu + [torch.empty(3, device="meta")], sharded=False)
    monkeypatch.setattr(optim, "DOT_NORM", False)
    _grad_norm(cpu, sharded=False)
    assert calls == ["dot", "torch", "torch", "torch"]
