"""Plain-torch references the kernel and loss tests compare against."""

from __future__ import annotations

import torch


def full_logits_divergence(hidden, weight, teacher_logits, kind, beta, temperature):
    """Independent reference: full logits, torch.distributions-free textbook formulas."""
    log_q = torch.log_softmax(hidden @ weight.t() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return (p * (log_p - log_q)).sum()
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum()
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - m.log())).sum() + (1 - beta) * (q * (log_q - m.log())).sum()


def random_expert_weights(generator: torch.Generator, experts: int, hidden: int, inter: int):
    """SwiGLU expert weights in the kernels' layout: gate/up `[E, H, 2I]`, down `[E, I, H]`."""
    w_gate_up_NHJ = torch.randn(experts, hidden, 2 * inter, generator=generator)
    w_down_NIH = torch.randn(experts, inter, hidden, generator=generator)
    return w_gate_up_NHJ, w_down_NIH
