"""Chunked fused `lm_head` + divergence: the loss and its gradients without full `[N, V]` logits.

For each chunk of tokens: logits = h @ Wᵀ, per-row divergence and d loss / d logits (one row kernel,
torch or Triton), then d h = d logits @ W and d W += d logitsᵀ @ h. The gradients are computed in the
forward pass (as in fused linear cross-entropy kernels), so only a `chunk × V` slab ever exists.

With z = logits / T, q = softmax(z_student), p = softmax(z_teacher), per token:
  forward_kl  KL(p‖q)                         d/dz = q − p
  reverse_kl  KL(q‖p)                         d/dz = q ⊙ (log q − log p − KL)
  jsd (β)     β KL(p‖m) + (1−β) KL(q‖m),      d/dz = q ⊙ (g − Σ q g),  g = (1−β) log(q/m)
              m = β p + (1−β) q  (GKD's generalised JSD; β → 0 or 1 vanishes, use the KLs)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")


def divergence_rows_torch(student_nV, teacher_nV, kind: str, beta: float = 0.5, temperature: float = 1.0):
    """(loss per row [n] fp32, d loss / d student logits [n, V] fp32)."""
    log_q = F.log_softmax(student_nV.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_nV.float() / temperature, dim=-1)
    q = log_q.exp()
    if kind == "forward_kl":
        p = log_p.exp()
        return (p * (log_p - log_q)).sum(-1), (q - p) / temperature
    if kind == "reverse_kl":
        d = log_q - log_p
        loss = (q * d).sum(-1)
        return loss, q * (d - loss[:, None]) / temperature
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    loss = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    g = (1 - beta) * (log_q - log_m)
    return loss, q * (g - (q * g).sum(-1, keepdim=True)) / temperature


def _rows(student, teacher, kind, beta, temperature, use_triton):
    if use_triton:
        from .triton_divergence import divergence_rows

        return divergence_rows(student, teacher, kind, beta, temperature)
    return divergence_rows_torch(student, teacher, kind, beta, temperature)


def _teacher_chunk(teacher, s: slice) -> torch.Tensor:
    if isinstance(teacher, torch.Tensor):
        return teacher[s]
    hidden, weight = teacher
    return hidden[s] @ weight.t()


class _LogitsDivergence(torch.autograd.Function):
    """Same row kernel on logits the caller already has; the gradient is kept in the logits' dtype."""

    @staticmethod
    def forward(ctx, student_NV, teacher_NV, kind, beta, temperature, chunk, use_triton):
        n = student_NV.shape[0]
        step = n if chunk <= 0 else chunk
        total = torch.zeros((), device=student_NV.device, dtype=torch.float32)
        grad = torch.empty_like(student_NV) if ctx.needs_input_grad[0] else None
        for start in range(0, n, step):
            s = slice(start, min(start + step, n))
            loss_n, grad_s = _rows(student_NV[s], teacher_NV[s].detach(), kind, beta, temperature, use_triton)
            total += loss_n.sum()
            if grad is not None:
                grad[s] = grad_s
        ctx.save_for_backward(*([] if grad is None else [grad]))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None


def logits_divergence(student_NV, teacher_NV, *, kind, beta=0.5, temperature=1.0, chunk=0, use_triton=False):
    """Sum over tokens of the divergence between teacher and student logits (same kinds as below);
    chunked over tokens (0: all at once), differentiable in the student logits only."""
    _check(kind, beta)
    return _LogitsDivergence.apply(student_NV, teacher_NV, kind, beta, temperature, chunk, use_triton)


def _check(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {KINDS}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"divergence: jsd needs 0 < beta < 1, got {beta} (use the KLs at 0 or 1)")


class _FusedLMHeadDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, teacher, kind, beta, temperature, chunk, use_triton):
        n = hidden_NH.shape[0]
        step = n if chunk <= 0 else chunk
        total = torch.zeros((), device=hidden_NH.device, dtype=torch.float32)
        grad_h = torch.empty_like(hidden_NH) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight_VH.shape, device=weight_VH.device, dtype=torch.float32)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, n, step):
            s = slice(start, min(start + step, n))
            logits = hidden_NH[s] @ weight_VH.t()
            with torch.no_grad():
                loss_n, grad_logits = _rows(
                    logits, _teacher_chunk(teacher, s).detach(), kind, beta, temperature, use_triton
                )
            total += loss_n.sum()
            if grad_h is not None:
                grad_h[s] = (grad_logits.to(weight_VH.dtype) @ weight_VH).to(hidden_NH.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), hidden_NH[s].float())
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight_VH.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_total.to(saved[0].dtype) if ctx.has[0] else None
        grad_w = (saved.pop(0) * grad_total).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None, None


def fused_lm_head_divergence(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk: int = 1024,
    use_triton: bool = False,
) -> torch.Tensor:
    """Sum over the N tokens of the divergence between the teacher and softmax(hidden @ weightᵀ).

    `teacher` is `[N, V]` logits (any dtype) or a (hidden `[N, H_t]`, lm_head weight `[V, H_t]`) pair,
    whose logits are then also formed one chunk at a time. Differentiable in hidden and weight.
    """
    _check(kind, beta)
    return _FusedLMHeadDivergence.apply(
        hidden_NH, weight_VH, teacher, kind, beta, temperature, chunk, use_triton
    )
