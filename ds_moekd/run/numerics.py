"""No training on NaN (docs/reliability.md, "Numerics").

DeepSpeed's ZeRO-3 optimizer already refuses an update whose global gradient norm is not finite:
it all-reduces the norm, zeroes the gradients and counts the step as skipped (the LR schedule
does not advance). A non-finite loss on any rank makes that rank's gradients, and so the reduced
norm, non-finite, so every rank skips the same step. This guard reads the two values that are
already global (the all-reduced loss and DeepSpeed's global norm), so every rank takes the same
decision without another collective, and applies the policy:

  skip: count the skipped step and go on, stopping once `max_skipped_steps` is exceeded;
  stop: stop at the first one.

A step that the optimizer applied although the norm was not finite (an engine that does not
skip) always stops: the weights may already be damaged. Before any checkpoint or export,
`check_finite_parameters` verifies every rank's parameter partition (one all-reduce).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from ds_moekd.run.errors import NumericsError
from ds_moekd.runtime.dist import any_rank
from ds_moekd.runtime.telemetry import log


class NumericsGuard:
    def __init__(self, policy: str, max_skipped: int, spike_factor: float, window: int = 20, skipped: int = 0):
        self.policy, self.max_skipped, self.spike_factor = policy, max_skipped, spike_factor
        self.skipped = skipped  # carried across resume in the checkpoint
        self.last_skipped = False  # the latest step's update was refused
        self._recent: deque[float] = deque(maxlen=window)

    def check(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> None:
        """Judge one finished optimizer step (1-based `step`); raise NumericsError to stop."""
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        self.last_skipped = not finite
        if finite:
            mean = sum(self._recent) / len(self._recent) if self._recent else None
            if self.spike_factor and mean and len(self._recent) >= 3 and loss > self.spike_factor * mean:
                log.warning("step %d: loss spike %.4g is %.1fx the running mean %.4g (train.spike_factor=%g)",
                            step, loss, loss / mean, mean, self.spike_factor)
            self._recent.append(loss)
            return
        what = f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} " \
               f"(loss {loss}, gradient norm {grad_norm})"
        if applied:
            raise NumericsError(f"{what}, and the optimizer applied the update; stopping without writing a "
                                "checkpoint or export. Resume from the last checkpoint with a lower optim.lr")
        self.skipped += 1
        if self.policy == "stop" or self.skipped > self.max_skipped:
            limit = "train.nonfinite=stop" if self.policy == "stop" else \
                f"{self.skipped} skipped steps > train.max_skipped_steps={self.max_skipped}"
            raise NumericsError(f"{what}; the update was skipped, but {limit}. Stopping without a checkpoint: "
                                "check the inputs (a NaN weight in the student or teacher?) or lower optim.lr, "
                                "then resume from the last checkpoint")
        log.warning("%s: update skipped (%d of at most %d)", what, self.skipped, self.max_skipped)


def step_outcome(engine) -> tuple[float | None, bool]:
    """(DeepSpeed's global gradient norm of the last optimizer step, whether it updated the weights)."""
    norm = engine.get_global_grad_norm()
    norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm) if norm is not None else None
    applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
    return norm, bool(applied)


def check_finite_parameters(engine, group, what: str) -> None:
    """Refuse to write `what` (a checkpoint, an export) when any rank holds a non-finite weight."""
    bad = False
    for param in engine.module.parameters():
        local = getattr(param, "ds_tensor", param)  # ZeRO-3: this rank's partition
        if local.numel() and not torch.isfinite(local.detach()).all():
            bad = True
            break
    if any_rank(bad, group):
        raise NumericsError(f"refusing to write {what}: the student has non-finite weights; "
                            "the previous checkpoint and export are kept")
