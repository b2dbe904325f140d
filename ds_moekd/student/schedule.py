"""The learning-rate schedule (`optim.schedule`) and the run's length in steps (`train.epochs`)."""

from __future__ import annotations

import math

from ds_moekd.config import OptimConfig


def lr_factor(optim: OptimConfig, total_steps: int):
    """LR multiplier per step: linear warmup, then cosine or linear decay to `min_lr_ratio`, or constant."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return factor


def total_steps(steps: int, epochs: int, micro_batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """`steps`, or with `epochs` > 0 the optimizer steps that take `epochs` passes over the data
    (at least one)."""
    if epochs <= 0:
        return steps
    return max(1, epochs * micro_batches_per_epoch // gradient_accumulation_steps)
