"""Schedules: warmup then cosine/linear/constant, and one-cycle, checked against their formulas."""

import math

import pytest
import torch

from peftcore.errors import ConfigError
from peftcore.train.optim import WARMUP_START, build_optimizer, build_scheduler


def _trajectory(schedule, total=20, warmup=4, lrs=(1.0, 0.25)):
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in lrs]
    optimizer = build_optimizer([{"params": [p], "lr": lr, "weight_decay": 0.0} for p, lr in zip(params, lrs)])
    scheduler = build_scheduler(optimizer, schedule, total, warmup)
    out = []
    for _ in range(total):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def _warmup(step, warmup):
    return WARMUP_START + (1 - WARMUP_START) * step / warmup


@pytest.mark.parametrize("schedule, after", [
    ("cosine", lambda t, n: 0.5 * (1 + math.cos(math.pi * t / n))),
    ("linear", lambda t, n: 1 - t / n),
    ("constant", lambda t, n: 1.0),
])
def test_warmup_then_decay(schedule, after):
    total, warmup = 20, 4
    for step, lrs in enumerate(_trajectory(schedule, total, warmup)):
        factor = _warmup(step, warmup) if step < warmup else after(step - warmup, total - warmup)
        assert lrs == pytest.approx([1.0 * factor, 0.25 * factor], abs=1e-9), step


def test_no_warmup_starts_at_the_peak():
    lrs = _trajectory("cosine", 10, 0)
    assert lrs[0] == pytest.approx([1.0, 0.25]) and lrs[-1][0] < 0.03


def test_one_cycle_rises_then_anneals_per_group():
    lrs = _trajectory("one-cycle", 20, 5)
    first = [lr[0] for lr in lrs]
    peak = first.index(max(first))
    assert max(first) == pytest.approx(1.0, rel=1e-6) and 3 <= peak <= 5
    assert first[0] == pytest.approx(1.0 / 25)  # OneCycleLR's div_factor
    assert all(a <= b for a, b in zip(first[:peak], first[1:peak + 1]))
    assert all(a >= b for a, b in zip(first[peak:], first[peak + 1:]))
    assert all(lr[1] == pytest.approx(lr[0] / 4) for lr in lrs)  # the group ratio holds


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "step"}, "unknown schedule 'step'"),
    ({"total_steps": 0}, "total_steps >= 1"),
    ({"warmup_steps": 10}, "warmup_steps < total_steps"),
])
def test_bad_schedules(kwargs, match):
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}])
    args = {"schedule": "cosine", "total_steps": 10, "warmup_steps": 0} | kwargs
    with pytest.raises(ConfigError, match=match):
        build_scheduler(optimizer, **args)


def test_empty_groups_are_an_error():
    with pytest.raises(ConfigError, match="no parameters to optimise"):
        build_optimizer([{"params": [], "lr": 1.0}])


def test_fused_adamw_on_cpu_parameters_and_the_same_update_as_the_default():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = build_optimizer([{"params": params, "lr": 1e-2, "weight_decay": 0.1}])
    plain = torch.optim.AdamW([{"params": twins, "lr": 1e-2, "weight_decay": 0.1}])
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))


def test_parameters_without_fused_kernels_get_the_default_adamw():
    param = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not build_optimizer([{"params": [param], "lr": 1.0}]).defaults["fused"]
