"""Chunked fused `lm_head` + loss: CE and a divergence with their gradients, without `[N, V]` logits.

For each chunk of tokens: logits = h @ Wᵀ, per-row CE and divergence with d loss / d logits (the
divergence row kernel in torch or Triton, CE in torch on the same slab), then d h = d logits @ W and
d W += d logitsᵀ @ h. The gradients are computed in the forward pass (as in fused linear
cross-entropy kernels), so only a `chunk × V` slab ever exists.

With z = logits / T, q = softmax(z_student), p = softmax(z_teacher), per token:
  forward_kl  KL(p‖q)                         d/dz = q − p
  reverse_kl  KL(q‖p)                         d/dz = q ⊙ (log q − log p − KL)
  jsd (β)     β KL(p‖m) + (1−β) KL(q‖m),      d/dz = q ⊙ (g − Σ q g),  g = (1−β) log(q/m)
              m = β p + (1−β) q  (GKD's generalised JSD; β → 0 or 1 vanishes, use the KLs)

A teacher kept as its top-k (`SparseTeacher`, an offline cache's targets) scores forward KL over
k + 1 outcomes: the k cached tokens and "any other token", whose teacher probability is the cached
tail mass and whose student probability is q's mass outside those k tokens:
  KL_k(p‖q) = Σ_top p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)
  d/dz_i = P q_i − p_i (i in the top k),  q_i (P − p_tail / q_tail) (otherwise),  P = Σ p
Merging outcomes never raises a KL, so KL_k ≤ KL, with equality at k = V (empty tail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")


def divergence_rows_torch(student_nV, teacher_nV, kind: str, beta: float = 0.5, temperature: float = 1.0):
    """(loss per row [n] fp32, d loss / d student logits [n, V] fp32)."""
    log_q = F.log_softmax(student_nV.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_nV.float() / temperature, dim=-1)
    if kind == "forward_kl":  # in place: three [n, V] fp32 buffers at most
        p = log_p.exp()
        loss = log_p.sub_(log_q).mul_(p).sum(-1)
        return loss, log_q.exp_().sub_(p).div_(temperature)
    q = log_q.exp()
    if kind == "reverse_kl":
        d = log_q - log_p
        loss = (q * d).sum(-1)
        return loss, q * (d - loss[:, None]) / temperature
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    loss = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    g = (1 - beta) * (log_q - log_m)
    return loss, q * (g - (q * g).sum(-1, keepdim=True)) / temperature


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher distribution kept as its top-k per token and draw (docs/teacher-cache.md):
    log-probabilities `[M, N, k]` at the loss's temperature, their token ids `[M, N, k]` (int64),
    and the log of the probability outside them `[M, N]` (−inf when nothing is left)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor

    def draws_at(self, s: slice):
        """(log-probabilities `[n, k]`, ids `[n, k]`, tail `[n]`) of rows s, one draw at a time."""
        for m in range(self.logprobs.shape[0]):
            yield self.logprobs[m, s], self.ids[m, s], self.tail[m, s]


def sparse_forward_kl_rows(student_nV, logprobs_nk, ids_nk, tail_n, temperature: float = 1.0):
    """(KL_k(p‖q) per row [n] fp32, d loss / d student logits [n, V] fp32) against a top-k teacher
    (module docstring); at k = V it equals `divergence_rows_torch(..., "forward_kl")`."""
    log_q = F.log_softmax(student_nV.float() / temperature, dim=-1)
    lp, tail = logprobs_nk.float(), tail_n.float()
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids_nk, True)
    log_q_tail = log_q.masked_fill(in_top, float("-inf")).logsumexp(-1)
    p_top, p_tail = lp.exp(), tail.exp()
    has_tail = p_tail > 0
    loss = (p_top * (lp - log_q.gather(1, ids_nk))).sum(-1)
    loss += torch.where(has_tail, p_tail * (tail - log_q_tail), 0.0)
    tail_ratio = torch.where(has_tail, (tail - log_q_tail).exp(), 0.0)  # p_tail / q_tail
    total = p_top.sum(-1) + p_tail
    grad = log_q.exp_().mul_(torch.where(in_top, total[:, None], (total - tail_ratio)[:, None]))
    return loss, grad.scatter_add_(1, ids_nk, -p_top).div_(temperature)


def _rows(student, teacher, kind, beta, temperature, use_triton):
    if use_triton:
        from .triton_divergence import divergence_rows

        return divergence_rows(student, teacher, kind, beta, temperature)
    return divergence_rows_torch(student, teacher, kind, beta, temperature)


MIN_AUTO_CHUNK = 64  # fewer rows make the per-chunk GEMMs inefficient and the Python loop long


def auto_token_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per fused chunk when none is given: chunk·V ≈ N·H, so each fp32 logits slab is about
    the size of the hidden states it comes from; a power of two, at least MIN_AUTO_CHUNK."""
    chunk = math.ceil(tokens / max(1, math.ceil(vocab / hidden)))
    return max(MIN_AUTO_CHUNK, 1 << max(0, chunk - 1).bit_length())


def _teacher_draws(teacher, s: slice):
    """The teacher's logits at rows s, one `[n, V]` tensor per draw, formed one draw at a time.

    `teacher` is `[N, V]` or `[M, N, V]` logits, or a (hidden `[N, H_t]` or `[M, N, H_t]`, lm_head
    weight `[V, H_t]`) pair; M independent teacher draws (KA) are scored one after another."""
    hidden, weight = (teacher, None) if isinstance(teacher, torch.Tensor) else teacher
    for draw in hidden.unsqueeze(0) if hidden.dim() == 2 else hidden:
        yield draw[s] if weight is None else draw[s] @ weight.t()


def _draw_rows(student_nV, teacher, s: slice, kind, beta, temperature, use_triton):
    """(loss per row, d loss / d student logits) of rows s against each teacher draw in turn (a
    top-k teacher through the torch row kernel: its [n, k] targets leave nothing for Triton to fuse)."""
    if isinstance(teacher, SparseTeacher):
        for logprobs_nk, ids_nk, tail_n in teacher.draws_at(s):
            yield sparse_forward_kl_rows(student_nV, logprobs_nk, ids_nk, tail_n, temperature)
        return
    for teacher_nV in _teacher_draws(teacher, s):
        yield _rows(student_nV, teacher_nV.detach(), kind, beta, temperature, use_triton)


def _mean_over_draws(student_nV, teacher, s: slice, kind, beta, temperature, use_triton):
    """(loss per row, d loss / d student logits) averaged over the teacher's draws: with M draws the
    loss is (1/M) Σ_m D(p_m, q), KA's average over teacher draws."""
    loss = grad = None
    draws = 0
    for loss_m, grad_m in _draw_rows(student_nV, teacher, s, kind, beta, temperature, use_triton):
        loss, grad = (loss_m, grad_m) if loss is None else (loss.add_(loss_m), grad.add_(grad_m))
        draws += 1
    if draws > 1:
        loss.div_(draws)
        grad.div_(draws)
    return loss, grad


def _check_teacher(teacher, tokens: int, vocab: int, kind: str) -> None:
    """Clear errors for teacher inputs whose token rows or vocabulary do not match the student's."""
    if isinstance(teacher, SparseTeacher):
        if kind != "forward_kl":
            raise ValueError(f"divergence: a top-k teacher (SparseTeacher) scores forward_kl only, not {kind!r}")
        if teacher.logprobs.dim() != 3 or teacher.logprobs.shape[1] != tokens or teacher.ids.shape != \
                teacher.logprobs.shape or teacher.tail.shape != teacher.logprobs.shape[:2]:
            raise ValueError(f"divergence: top-k teacher {tuple(teacher.logprobs.shape)} does not match the "
                             f"student's {tokens} tokens (expected [M, N, k] with ids alike and tail [M, N])")
        return
    hidden, weight = (teacher, None) if isinstance(teacher, torch.Tensor) else teacher
    rows = hidden.shape[-2] if hidden.dim() in (2, 3) else None
    teacher_vocab = hidden.shape[-1] if weight is None else weight.shape[0]
    if rows != tokens or teacher_vocab != vocab or (weight is not None and weight.shape[1] != hidden.shape[-1]):
        shapes = tuple(hidden.shape) if weight is None else (tuple(hidden.shape), tuple(weight.shape))
        raise ValueError(
            f"divergence: teacher {shapes} does not match the student's {tokens} tokens x {vocab} vocabulary "
            "(expected [N, V] or [M, N, V] logits, or ([N, H_t] or [M, N, H_t] hidden, [V, H_t] lm_head))"
        )


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
            loss_n, grad_s = _mean_over_draws(student_NV[s], teacher_NV, s, kind, beta, temperature, use_triton)
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
    chunked over tokens (0: all at once), differentiable in the student logits only. Teacher logits
    `[M, N, V]` are M draws: the divergence is averaged over them."""
    _check(kind, beta)
    _check_teacher(teacher_NV, *student_NV.shape, kind)
    return _LogitsDivergence.apply(student_NV, teacher_NV, kind, beta, temperature, chunk, use_triton)


def _check(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {KINDS}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"divergence: jsd needs 0 < beta < 1, got {beta} (use the KLs at 0 or 1)")


def _cross_entropy_rows(logits_nV: torch.Tensor, targets_n: torch.Tensor):
    """(−log q(target) per row [n] fp32, its gradient softmax − onehot [n, V] fp32); always at T = 1."""
    log_q = F.log_softmax(logits_nV.float(), dim=-1)
    loss = -log_q.gather(1, targets_n[:, None]).squeeze(1)
    grad = log_q.exp_()
    grad[torch.arange(len(targets_n), device=grad.device), targets_n] -= 1.0
    return loss, grad


class _FusedLMHeadLoss(torch.autograd.Function):
    """Outputs (ce_weight·CE + div_weight·divergence, CE, divergence), each summed over tokens; only
    the first is differentiable. Both gradients are formed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, teacher, targets_N, terms, chunk, use_triton):
        kind, beta, temperature, ce_weight, div_weight = terms
        n = hidden_NH.shape[0]
        step = chunk if chunk > 0 else auto_token_chunk(n, *weight_VH.shape)
        ce_sum = torch.zeros((), device=hidden_NH.device, dtype=torch.float32)
        div_sum = torch.zeros((), device=hidden_NH.device, dtype=torch.float32)
        grad_h = torch.empty_like(hidden_NH) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight_VH.shape, device=weight_VH.device, dtype=torch.float32)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, n, step):
            s = slice(start, min(start + step, n))
            with torch.no_grad():
                logits = hidden_NH[s] @ weight_VH.t()
                grad_logits = 0.0
                if targets_N is not None:
                    loss_n, grad_ce = _cross_entropy_rows(logits, targets_N[s])
                    ce_sum += loss_n.sum()
                    grad_logits = grad_ce.mul_(ce_weight)
                if teacher is not None:
                    loss_n, grad_div = _mean_over_draws(logits, teacher, s, kind, beta, temperature, use_triton)
                    div_sum += loss_n.sum()
                    grad_logits = grad_div.mul_(div_weight).add_(grad_logits)
            if grad_h is not None:
                grad_h[s] = (grad_logits.to(weight_VH.dtype) @ weight_VH).to(hidden_NH.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), hidden_NH[s].float())
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight_VH.dtype
        ctx.mark_non_differentiable(ce_sum, div_sum)
        return ce_weight * ce_sum + div_weight * div_sum, ce_sum, div_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_div):
        saved = list(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.has[0]:
            grad_h = saved.pop(0)
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if ctx.has[1]:
            grad_w = (saved.pop(0) * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_lm_head_loss(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    targets_N: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    div_weight: float = 1.0,
    chunk: int = 0,
    use_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_weight·CE + div_weight·D, CE, D) summed over the N tokens, with q = softmax(hidden @ weightᵀ):
    CE = −log q(target) (at T = 1; needs `targets_N`), D the divergence `kind` between the teacher
    and q at `temperature` (needs `teacher`). Differentiable in hidden and weight through the first.

    `teacher` is `[N, V]` logits (any dtype) or a (hidden `[N, H_t]`, lm_head weight `[V, H_t]`) pair,
    whose logits are then also formed one chunk at a time; None scores CE alone. With a leading draw
    dimension (`[M, N, V]` or `[M, N, H_t]` hidden) D is averaged over the M teacher draws (KA), the
    student's logits formed once per chunk for all of them. `chunk` tokens are scored at a time
    (0: `auto_token_chunk`).
    """
    _check(kind, beta)
    if teacher is not None:
        _check_teacher(teacher, hidden_NH.shape[0], weight_VH.shape[0], kind)
    if teacher is None and targets_N is None:
        raise ValueError("fused_lm_head_loss: give the teacher, the targets or both")
    terms = (kind, beta, temperature, ce_weight if targets_N is not None else 0.0,
             div_weight if teacher is not None else 0.0)
    return _FusedLMHeadLoss.apply(hidden_NH, weight_VH, teacher, targets_N, terms, chunk, use_triton)
