"""What a method decides: whether it needs the teacher, and the loss on response tokens."""

from __future__ import annotations

from typing import Protocol

import torch


class Method(Protocol):
    name: str
    needs_teacher: bool

    def loss(
        self,
        student_logits: torch.Tensor,  # [N, V] at response positions, with grad
        teacher_logits: torch.Tensor | None,  # [N, V] at the same positions, no grad
        targets: torch.Tensor,  # [N] the dataset's next tokens
        global_tokens: float,  # response tokens in the whole global batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (this micro-batch's share of the global-mean loss, its parts for logging)."""
        ...
