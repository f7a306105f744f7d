"""Value tests of the lr schedule and of the LambdaLR scheduler built from it."""

import math

import pytest
import torch

from rlhfkit.train.optim import build_scheduler, lr_factor


def test_warmup_is_linear_from_one_over_warmup():
    # (step + 1) / warmup for step < warmup, whatever the schedule
    for schedule in ("cosine", "linear", "constant"):
        got = [lr_factor(s, 10, 4, schedule, 0.1) for s in range(4)]
        assert got == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-12)


@pytest.mark.parametrize("step, expected", [
    (4, 1.0),  # progress (4 - 4) / 6 = 0: full lr right after warm-up
    (5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6))),  # progress 1/6: 0.1 + 0.9 * 0.9330127 = 0.9397114
    (7, 0.1 + 0.9 * 0.5),  # midpoint, cos(pi/2) = 0: 0.55
    (10, 0.1),  # end, cos(pi) = -1: min_ratio
    (15, 0.1),  # past the end: progress is capped at 1
])
def test_cosine(step, expected):
    assert lr_factor(step, 10, 4, "cosine", 0.1) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("step, expected", [
    (4, 1.0), (5, 0.1 + 0.9 * 5 / 6), (7, 0.55), (10, 0.1), (12, 0.1),  # 0.1 + 0.9 * (1 - progress)
])
def test_linear(step, expected):
    assert lr_factor(step, 10, 4, "linear", 0.1) == pytest.approx(expected, abs=1e-9)


def test_constant_and_no_warmup():
    assert [lr_factor(s, 10, 0, "constant", 0.1) for s in (0, 5, 10, 20)] == [1.0] * 4
    assert lr_factor(0, 10, 0, "cosine") == 1.0  # no warm-up: progress 0 / 10 at step 0
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5, abs=1e-12)  # min_ratio 0, midpoint
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5, abs=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosin"):
        lr_factor(5, 10, 0, "cosin")
    with pytest.raises(ValueError, match="cosin"):
        build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), 10, 0, "cosin")


def test_unknown_schedule_is_refused_at_build_time_with_warmup():
    with pytest.raises(ValueError, match="cosin"):
        build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), 10, 2, "cosin")


def test_scheduler_with_adamw_follows_the_factors():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.1}])
    sched = build_scheduler(opt, total=6, warmup=2, schedule="cosine", min_ratio=0.0)
    c = 0.5 * (1 + math.cos(math.pi / 4))  # progress 1/4: 0.8535534; progress 3/4 gives 1 - c
    factors = [0.5, 1.0, 1.0, c, 0.5, 1 - c, 0.0]  # warm-up 1/2, 2/2, then progress 0, 1/4, 2/4, 3/4, 1
    for step, factor in enumerate(factors):
        assert sched.get_last_lr() == pytest.approx([0.01 * factor, 0.1 * factor], abs=1e-12), step
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * factor, 0.1 * factor], abs=1e-12)
        (a.sum() + b.sum()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
