"""Fused elementwise steps of the dense path: SwiGLU times the gate weight, and its backward.

One program per (token, expert): it reads that expert's gate/up row of the expert-major
`[E, T, 2I]` GEMM output and writes the token-major `[T, E·I]` input of the down GEMM, so the
layout change costs nothing extra.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def swiglu_scale_kernel(gu_ptr, g_ptr, a_ptr, T, E, I, BLOCK_I: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64)
    g = tl.load(g_ptr + t * E + e).to(tl.float32)
    gu_row = gu_ptr + (e * T + t) * 2 * I
    a_row = a_ptr + (t * E + e) * I
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        ok = i < I
        gate = tl.load(gu_row + i, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gu_row + I + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(a_row + i, (g * gate * tl.sigmoid(gate) * up).to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def swiglu_scale_backward_kernel(gu_ptr, g_ptr, da_ptr, dgu_ptr, dg_ptr, T, E, I, BLOCK_I: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64)
    g = tl.load(g_ptr + t * E + e).to(tl.float32)
    gu_row = gu_ptr + (e * T + t) * 2 * I
    dgu_row = dgu_ptr + (e * T + t) * 2 * I
    da_row = da_ptr + (t * E + e) * I
    dg = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        ok = i < I
        gate = tl.load(gu_row + i, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gu_row + I + i, mask=ok, other=0.0).to(tl.float32)
        da = tl.load(da_row + i, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        dg += da * silu * up
        dact = da * g
        tl.store(
            dgu_row + i, (dact * up * sig * (1 + gate * (1 - sig))).to(dgu_ptr.dtype.element_ty), mask=ok
        )
        tl.store(dgu_row + I + i, (dact * silu).to(dgu_ptr.dtype.element_ty), mask=ok)
    tl.store(dg_ptr + t * E + e, tl.sum(dg, axis=0))


def _block(inter: int) -> int:
    return min(1024, triton.next_power_of_2(inter))


def swiglu_scale(gate_up_ETJ: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
    """[E, T, 2I] gate/up and [T, E] gate weights -> [T, E·I] weighted activations."""
    num_experts, tokens, two_inter = gate_up_ETJ.shape
    a = gate_up_ETJ.new_empty(tokens, num_experts * (two_inter // 2))
    if a.numel():
        swiglu_scale_kernel[(tokens, num_experts)](
            gate_up_ETJ.contiguous(),
            gates_TE.contiguous(),
            a,
            tokens,
            num_experts,
            two_inter // 2,
            BLOCK_I=_block(two_inter // 2),
        )
    return a


def swiglu_scale_backward(gate_up_ETJ: torch.Tensor, gates_TE: torch.Tensor, grad_a_TEI: torch.Tensor):
    """-> (d gate_up [E, T, 2I], d gates [T, E] in fp32)."""
    num_experts, tokens, two_inter = gate_up_ETJ.shape
    grad_gate_up = torch.empty_like(gate_up_ETJ)
    grad_gates = torch.empty(tokens, num_experts, device=gates_TE.device, dtype=torch.float32)
    if grad_gate_up.numel():
        swiglu_scale_backward_kernel[(tokens, num_experts)](
            gate_up_ETJ.contiguous(),
            gates_TE.contiguous(),
            grad_a_TEI.contiguous(),
            grad_gate_up,
            grad_gates,
            tokens,
            num_experts,
            two_inter // 2,
            BLOCK_I=_block(two_inter // 2),
        )
    return grad_gate_up, grad_gates
