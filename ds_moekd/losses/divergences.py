"""Token-level divergences between teacher (p) and student (q) next-token distributions.

All functions take logits already restricted to the response positions, `[N, V]`, and return
the *sum* over those N tokens (the caller divides by the global token count, losses/scaling.py).
Work is chunked over tokens so the fp32 log-softmax working set stays `chunk x V`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(n: int, chunk: int) -> list[slice]:
    step = n if chunk <= 0 else chunk
    return [slice(i, min(i + step, n)) for i in range(0, max(n, 1), step)]


def forward_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, temperature: float = 1.0, chunk: int = 0
) -> torch.Tensor:
    """sum_tokens KL(p || q) = sum_v p (log p - log q); teacher logits carry no gradient."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    for s in _chunks(student_logits.shape[0], chunk):
        log_q = F.log_softmax(student_logits[s].float() / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits[s].detach().float() / temperature, dim=-1)
        total = total + (log_p.exp() * (log_p - log_q)).sum()
    return total


def reverse_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, temperature: float = 1.0, chunk: int = 0
) -> torch.Tensor:
    """sum_tokens KL(q || p) = sum_v q (log q - log p)."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    for s in _chunks(student_logits.shape[0], chunk):
        log_q = F.log_softmax(student_logits[s].float() / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits[s].detach().float() / temperature, dim=-1)
        total = total + (log_q.exp() * (log_q - log_p)).sum()
    return total


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_tokens -log q(target)."""
    return F.cross_entropy(student_logits.float(), targets, reduction="sum")
