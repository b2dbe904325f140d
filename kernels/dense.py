"""Dense all-expert path (DESIGN §4 path 2): every token through every expert, weighted.

  gate_up [E, T, 2I] = x @ w_gate_up[e]            (one batched GEMM, no weight copy)
  a       [T, E·I]   = g[t, e] * silu(gate) * up   (elementwise; lands in token-major layout)
  y       [T, H]     = a @ w_down.view(E·I, H)     (one GEMM: the sum over experts is in its K)
Backward (weights frozen): d a = dy @ w_downᵀ (one GEMM); d g[t, e] = sum_i d a · silu(gate)·up —
the layer-local part of SAR's router gradient; d x = sum_e d gate_up[e] @ w_gate_up[e]ᵀ.
The elementwise steps run in torch or in one fused Triton kernel each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _swiglu_scale_torch(gate_up_ETJ: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_ETJ.chunk(2, dim=-1)
    a_ETI = F.silu(gate)  # in place from here: each extra pass over [E, T, I] costs as much as a GEMM on CPU
    a_ETI.mul_(up).mul_(gates_TE.t().unsqueeze(-1))
    return a_ETI.transpose(0, 1).reshape(gates_TE.shape[0], -1)


def _swiglu_scale_backward_torch(gate_up_ETJ, gates_TE, grad_a_TEI):
    gate, up = gate_up_ETJ.float().chunk(2, dim=-1)
    grad_a_ETI = grad_a_TEI.float().transpose(0, 1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_gates_TE = (grad_a_ETI * silu * up).sum(-1).t()
    grad_act = grad_a_ETI * gates_TE.t().float().unsqueeze(-1)
    grad_gate = grad_act * up * sig * (1 + gate * (1 - sig))
    grad_gate_up = torch.cat([grad_gate, grad_act * silu], dim=-1).to(gate_up_ETJ.dtype)
    return grad_gate_up, grad_gates_TE


def _gate_up(x_TH: torch.Tensor, w_gate_up_EHJ: torch.Tensor) -> torch.Tensor:
    """[E, T, 2I]: a strided-batched GEMM whose x operand has batch stride 0 (never copied E times)."""
    return torch.bmm(x_TH.expand(w_gate_up_EHJ.shape[0], -1, -1), w_gate_up_EHJ)


class _DenseSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH, use_triton):
        num_experts, inter, hidden = w_down_EIH.shape
        gate_up_ETJ = _gate_up(x_TH, w_gate_up_EHJ)
        if use_triton:
            from .triton_swiglu import swiglu_scale

            a_TX = swiglu_scale(gate_up_ETJ, gates_TE)
        else:
            a_TX = _swiglu_scale_torch(gate_up_ETJ, gates_TE)
        ctx.save_for_backward(x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH)
        ctx.use_triton = use_triton
        return a_TX @ w_down_EIH.reshape(num_experts * inter, hidden)

    @staticmethod
    def backward(ctx, grad_y_TH):
        x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH = ctx.saved_tensors
        num_experts, inter, hidden = w_down_EIH.shape
        gate_up_ETJ = _gate_up(x_TH, w_gate_up_EHJ)  # recomputed: [E, T, 2I] is the largest activation
        grad_a_TEI = (grad_y_TH.to(x_TH.dtype) @ w_down_EIH.reshape(num_experts * inter, hidden).t()).view(
            x_TH.shape[0], num_experts, inter
        )
        if ctx.use_triton:
            from .triton_swiglu import swiglu_scale_backward

            grad_gate_up_ETJ, grad_gates_TE = swiglu_scale_backward(gate_up_ETJ, gates_TE, grad_a_TEI)
        else:
            grad_gate_up_ETJ, grad_gates_TE = _swiglu_scale_backward_torch(gate_up_ETJ, gates_TE, grad_a_TEI)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_gate_up_ETJ, w_gate_up_EHJ.transpose(1, 2)).sum(0, dtype=torch.float32)
            grad_x = grad_x.to(x_TH.dtype)
        return grad_x, grad_gates_TE.to(gates_TE.dtype), None, None, None


def dense_swiglu(
    x_TH: torch.Tensor,
    gates_TE: torch.Tensor,
    w_gate_up_EHJ: torch.Tensor,
    w_down_EIH: torch.Tensor,
    *,
    use_triton: bool = False,
) -> torch.Tensor:
    """sum_e gates[t, e] * expert_e(x[t]); differentiable in x and in the gate weights."""
    num_experts, hidden, _ = w_gate_up_EHJ.shape
    if gates_TE.shape != (x_TH.shape[0], num_experts) or x_TH.shape[-1] != hidden:
        raise ValueError(
            f"dense_swiglu: x {tuple(x_TH.shape)}, gate weights {tuple(gates_TE.shape)} and weights "
            f"{tuple(w_gate_up_EHJ.shape)} disagree (need [T, H], [T, E], [E, H, 2I])"
        )
    return _DenseSwiGLU.apply(x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH, use_triton)
