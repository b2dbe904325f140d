"""Sparse path (docs/kernels.md, path 1): SwiGLU experts on rows grouped by expert, one grouped GEMM each
for gate/up and down, with the backward for the inputs (expert weights are frozen).

A backend is a grouped matmul `mm(a_RK, b_EKN, tokens_per_expert_E) -> [R, N]`; the Triton one also
fuses SwiGLU into the gate/up GEMM's epilogue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GroupedMatmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def loop_matmul(a_RK: torch.Tensor, b_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """The torch backend: one GEMM per non-empty group."""
    out = a_RK.new_empty(a_RK.shape[0], b_EKN.shape[2])
    start = 0
    for e, size in enumerate(tokens_per_expert_E.tolist()):
        if size:
            torch.matmul(a_RK[start : start + size], b_EKN[e], out=out[start : start + size])
            start += size
    return out


def grouped_mm_matmul(
    a_RK: torch.Tensor, b_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """`torch.nn.functional.grouped_mm` (torch ≥ 2.10) or `torch._grouped_mm`: offsets are group ends."""
    offsets = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a_RK, b_EKN, offs=offsets)


def megablocks_matmul(
    a_RK: torch.Tensor, b_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    from megablocks import grouped_gemm_util as gg  # the `gpu` extra; dispatcher checks it first

    # gmm wants [E, K, N] contiguous and the group sizes on the host
    return gg.ops.gmm(a_RK, b_EKN.contiguous(), tokens_per_expert_E.cpu().to(torch.int64), trans_b=False)


def triton_matmul(a_RK: torch.Tensor, b_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    from .triton_grouped_gemm import grouped_matmul

    return grouped_matmul(a_RK, b_EKN, tokens_per_expert_E)


def _swiglu_forward(mm: GroupedMatmul, fused: bool, x, sizes, w_gate_up_EHJ) -> torch.Tensor:
    if fused:
        from .triton_grouped_gemm import grouped_matmul

        return grouped_matmul(x, w_gate_up_EHJ, sizes, swiglu=True)
    gate, up = mm(x, w_gate_up_EHJ, sizes).chunk(2, dim=-1)
    return F.silu(gate) * up


def _expert_by_expert(x_RH, tokens_per_expert_E, w_gate_up_EHJ, w_down_EIH) -> torch.Tensor:
    """The torch backend's forward: each expert's whole FFN on its rows before the next expert, so
    its [rows, 2I] intermediate is still in cache for the down GEMM (on CPU that beats two passes
    over all rows, each with full-size intermediates)."""
    out = x_RH.new_empty(x_RH.shape[0], w_down_EIH.shape[2])
    start = 0
    for e, size in enumerate(tokens_per_expert_E.tolist()):
        if size:
            gate, up = (x_RH[start : start + size] @ w_gate_up_EHJ[e]).chunk(2, dim=-1)
            torch.matmul(F.silu(gate).mul_(up), w_down_EIH[e], out=out[start : start + size])
            start += size
    return out


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RH, tokens_per_expert_E, w_gate_up_EHJ, w_down_EIH, mm, fused):
        ctx.save_for_backward(x_RH, tokens_per_expert_E, w_gate_up_EHJ, w_down_EIH)
        ctx.mm = mm
        if mm is loop_matmul:
            return _expert_by_expert(x_RH, tokens_per_expert_E, w_gate_up_EHJ, w_down_EIH)
        return mm(
            _swiglu_forward(mm, fused, x_RH, tokens_per_expert_E, w_gate_up_EHJ),
            w_down_EIH,
            tokens_per_expert_E,
        )

    @staticmethod
    def backward(ctx, grad_y_RH):
        x_RH, sizes, w_gate_up_EHJ, w_down_EIH = ctx.saved_tensors
        mm = ctx.mm
        # recompute gate/up rather than keep [R, 2I] alive between forward and backward
        gate, up = mm(x_RH, w_gate_up_EHJ, sizes).float().chunk(2, dim=-1)
        grad_h = mm(grad_y_RH.contiguous(), w_down_EIH.transpose(1, 2), sizes).float()
        sig = torch.sigmoid(gate)
        grad_gate = grad_h * up * sig * (1 + gate * (1 - sig))
        grad_gate_up = torch.cat([grad_gate, grad_h * gate * sig], dim=-1).to(x_RH.dtype)
        grad_x = mm(grad_gate_up, w_gate_up_EHJ.transpose(1, 2), sizes)
        return grad_x, None, None, None, None, None


def grouped_swiglu(
    x_RH: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_up_EHJ: torch.Tensor,
    w_down_EIH: torch.Tensor,
    mm: GroupedMatmul,
    *,
    fused_swiglu: bool = False,
) -> torch.Tensor:
    """Expert e on its contiguous rows of x; differentiable in x (weights are frozen)."""
    return _GroupedSwiGLU.apply(x_RH, tokens_per_expert_E, w_gate_up_EHJ, w_down_EIH, mm, fused_swiglu)
