"""Token-level divergences between teacher (p) and student (q) next-token distributions.

All functions take logits already restricted to the response positions, `[N, V]`, and return
the *sum* over those N tokens (the caller divides by the global token count, losses/scaling.py).
They run through the kernel dispatcher (`ds_moekd.kernels.divergence`: torch on CPU, the Triton
row kernel on a GPU; `backend` forces one): chunked over tokens so the fp32 working set stays
`chunk x V`, with the gradient for the student logits formed in the same pass. Teacher logits
carry no gradient. When only hidden states are at hand, losses/fused.py never forms the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_moekd.kernels import divergence


def forward_kl(
    teacher_logits, student_logits, *, temperature: float = 1.0, chunk: int = 0, backend: str = "auto"
):
    """sum_tokens KL(p || q) = sum_v p (log p - log q)."""
    return divergence(
        student_logits,
        teacher_logits,
        kind="forward_kl",
        temperature=temperature,
        chunk=chunk,
        backend=backend,
    )


def reverse_kl(
    teacher_logits, student_logits, *, temperature: float = 1.0, chunk: int = 0, backend: str = "auto"
):
    """sum_tokens KL(q || p) = sum_v q (log q - log p)."""
    return divergence(
        student_logits,
        teacher_logits,
        kind="reverse_kl",
        temperature=temperature,
        chunk=chunk,
        backend=backend,
    )


def generalized_jsd(
    teacher_logits,
    student_logits,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk: int = 0,
    backend: str = "auto",
):
    """sum_tokens beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD), 0 < beta < 1."""
    return divergence(
        student_logits,
        teacher_logits,
        kind="jsd",
        beta=beta,
        temperature=temperature,
        chunk=chunk,
        backend=backend,
    )


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_tokens -log q(target)."""
    return F.cross_entropy(student_logits.float(), targets, reduction="sum")
