"""LR schedules against torch's own schedulers, and the run length from epochs."""

from __future__ import annotations

import pytest
import torch

from ds_moekd.config import OptimConfig
from ds_moekd.student.schedule import lr_factor, total_steps

WARMUP, TOTAL, FLOOR = 3, 20, 0.1


def torch_reference(schedule: str) -> list[float]:
    """Multipliers after warmup from torch.optim.lr_scheduler (an independent implementation)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL - WARMUP, eta_min=FLOOR)
    elif schedule == "linear":
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=FLOOR, total_iters=TOTAL - WARMUP)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    out = []
    for _ in range(TOTAL - WARMUP):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_match_torch(schedule):
    factor = lr_factor(OptimConfig(warmup_steps=WARMUP, schedule=schedule, min_lr_ratio=FLOOR), TOTAL)
    assert [factor(s) for s in range(WARMUP)] == pytest.approx([1 / 4, 2 / 4, 3 / 4])  # linear warmup
    assert [factor(s) for s in range(WARMUP, TOTAL)] == pytest.approx(torch_reference(schedule), abs=1e-6)
    assert factor(TOTAL + 5) == pytest.approx(1.0 if schedule == "constant" else FLOOR)  # stays at the end value


def test_epochs_set_the_number_of_steps():
    assert total_steps(100, 0, 7, 1) == 100  # no epochs: steps as given
    assert total_steps(100, 2, 7, 1) == 14
    assert total_steps(100, 3, 7, 2) == 10  # 21 micro-batches, 2 per optimizer step
    assert total_steps(100, 1, 1, 4) == 1  # never zero steps
