"""Triton row kernel of the fused divergence: per-token loss and d loss / d student logits.

One program per token, three sweeps over the vocabulary in blocks: (1) online max / sum-exp of
both distributions, (2) the loss and the row constant of the gradient, (3) the gradient. The row
never exists in fp32 beyond one block. Formulas in kernels/divergence.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _log_probs(s_row, t_row, v, ok, inv_t, max_s, lse_s, max_t, lse_t):
    zs = tl.load(s_row + v, mask=ok, other=0.0).to(tl.float32) * inv_t
    zt = tl.load(t_row + v, mask=ok, other=0.0).to(tl.float32) * inv_t
    return zs - max_s - lse_s, zt - max_t - lse_t


@triton.jit
def divergence_rows_kernel(
    s_ptr,
    t_ptr,
    loss_ptr,
    grad_ptr,
    V,
    stride_s,
    stride_t,
    stride_g,
    inv_t,
    beta,
    log_beta,
    log_1m_beta,
    KIND: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = grad_ptr + row * stride_g
    max_s = -float("inf")
    max_t = -float("inf")
    sum_s = 0.0
    sum_t = 0.0
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        ok = v < V
        zs = tl.load(s_row + v, mask=ok, other=-float("inf")).to(tl.float32) * inv_t
        zt = tl.load(t_row + v, mask=ok, other=-float("inf")).to(tl.float32) * inv_t
        new_s = tl.maximum(max_s, tl.max(zs, axis=0))
        new_t = tl.maximum(max_t, tl.max(zt, axis=0))
        sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.exp(zs - new_s), axis=0)
        sum_t = sum_t * tl.exp(max_t - new_t) + tl.sum(tl.exp(zt - new_t), axis=0)
        max_s = new_s
        max_t = new_t
    lse_s = tl.log(sum_s)
    lse_t = tl.log(sum_t)
    loss = tl.zeros((BLOCK_V,), dtype=tl.float32)
    qg = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        ok = v < V
        log_q, log_p = _log_probs(s_row, t_row, v, ok, inv_t, max_s, lse_s, max_t, lse_t)
        q = tl.where(ok, tl.exp(log_q), 0.0)
        p = tl.where(ok, tl.exp(log_p), 0.0)
        if KIND == 0:
            loss += p * (log_p - log_q)
        elif KIND == 1:
            loss += q * (log_q - log_p)
        else:
            log_m = tl.maximum(log_p + log_beta, log_q + log_1m_beta)
            log_m += tl.log(1.0 + tl.exp(-tl.abs((log_p + log_beta) - (log_q + log_1m_beta))))
            loss += beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
            qg += q * (1.0 - beta) * (log_q - log_m)
    row_loss = tl.sum(loss, axis=0)
    if KIND == 1:
        row_qg = row_loss
    else:
        row_qg = tl.sum(qg, axis=0)
    tl.store(loss_ptr + row, row_loss)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        ok = v < V
        log_q, log_p = _log_probs(s_row, t_row, v, ok, inv_t, max_s, lse_s, max_t, lse_t)
        q = tl.exp(log_q)
        if KIND == 0:
            grad = q - tl.exp(log_p)
        elif KIND == 1:
            grad = q * (log_q - log_p - row_qg)
        else:
            log_m = tl.maximum(log_p + log_beta, log_q + log_1m_beta)
            log_m += tl.log(1.0 + tl.exp(-tl.abs((log_p + log_beta) - (log_q + log_1m_beta))))
            grad = q * ((1.0 - beta) * (log_q - log_m) - row_qg)
        tl.store(g_row + v, grad * inv_t, mask=ok)


def divergence_rows(
    student_nV: torch.Tensor, teacher_nV: torch.Tensor, kind: str, beta: float, temperature: float
):
    """Same contract as `divergence_rows_torch`."""
    n, vocab = student_nV.shape
    loss = torch.empty(n, device=student_nV.device, dtype=torch.float32)
    grad = torch.empty(n, vocab, device=student_nV.device, dtype=torch.float32)
    if n:
        student_nV, teacher_nV = student_nV.contiguous(), teacher_nV.contiguous()
        b = min(max(beta, 1e-30), 1 - 1e-7)  # logs only used for jsd, where 0 < beta < 1
        divergence_rows_kernel[(n,)](
            student_nV,
            teacher_nV,
            loss,
            grad,
            vocab,
            student_nV.stride(0),
            teacher_nV.stride(0),
            grad.stride(0),
            1.0 / temperature,
            beta,
            math.log(b),
            math.log1p(-b),
            KIND=KIND_CODES[kind],
            BLOCK_V=min(4096, triton.next_power_of_2(vocab)),
        )
    return loss, grad
