"""Dense all-expert path (docs/kernels.md, path 2): every token through every expert, weighted.

Tokens go through in blocks of c rows (c = all T tokens on a GPU, CPU_TOKEN_CHUNK on CPU):
  gate_up [E, c, 2I] = x @ w_gate_up[e]            (one batched GEMM, no weight copy)
  a       [c, E·I]   = g[t, e] * silu(gate) * up   (elementwise; lands in token-major layout)
  y       [c, H]     = a @ w_down.view(E·I, H)     (one GEMM: the sum over experts is in its K)
Backward (weights frozen), in the same blocks since every step is token-wise:
  d a = dy @ w_downᵀ; d g[t, e] = sum_i d a · silu(gate)·up — the layer-local part of SAR's router
  gradient; d x = sum_e d gate_up[e] @ w_gate_up[e]ᵀ (gate_up is recomputed, not saved).
The elementwise steps run in torch or in one fused Triton kernel each way.

Why blocks on CPU: a block's intermediates (2 MiB for [E, c, I] at the tiny preset) stay in cache
from the GEMM that writes them to the one that reads them, and the allocator reuses their memory
block after block. All T tokens at once make intermediates of tens of MiB that go to DRAM on every
pass, and glibc hands such sizes back to the OS when freed, so every call page-faults them in again
(measured at the tiny preset: forward 2x, backward 3x slower than blocks of 256). A GPU wants the
largest GEMMs it can get, so there one block holds every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_TOKEN_CHUNK = 256  # tokens per block on CPU: the [E, chunk, 2I] intermediate stays in cache (see above)


def _token_blocks(tokens: int, device: torch.device) -> list[slice]:
    """Row ranges processed together: CPU_TOKEN_CHUNK rows at a time on CPU, all rows elsewhere
    (always at least one block: an empty one when there are no tokens)."""
    step = CPU_TOKEN_CHUNK if device.type == "cpu" else max(tokens, 1)
    return [slice(start, min(start + step, tokens)) for start in range(0, max(tokens, 1), step)]


def _each_expert(x_TK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
    """[E, T, N] = x @ w[e] for every expert: one strided-batched GEMM, x with batch stride 0 (never copied)."""
    return torch.bmm(x_TK.expand(w_EKN.shape[0], -1, -1), w_EKN)


def _swiglu_scale_torch(gate_up_ETJ: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
    """[E, T, 2I] gate/up and [T, E] gate weights -> [T, E·I] weighted activations."""
    gate, up = gate_up_ETJ.chunk(2, dim=-1)
    a_ETI = F.silu(gate)  # in place from here: each extra pass over [E, T, I] costs as much as a GEMM on CPU
    a_ETI.mul_(up).mul_(gates_TE.t().unsqueeze(-1))
    return a_ETI.transpose(0, 1).flatten(1)


def _swiglu_scale_backward_torch(gate_up_ETJ, gates_TE, grad_a_ETI):
    """d a [E, T, I] -> (d gate_up [E, T, 2I], d gates [T, E] in fp32); in fp32, in place where it can."""
    gate, up = gate_up_ETJ.float().chunk(2, dim=-1)
    grad_a_ETI = grad_a_ETI.float()
    grad_gate_up = torch.empty(gate_up_ETJ.shape, device=gate_up_ETJ.device, dtype=torch.float32)
    grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    scratch = silu * up
    grad_gates_TE = scratch.mul_(grad_a_ETI).sum(-1).t()  # sum_i d a · silu(gate)·up
    grad_act = torch.mul(grad_a_ETI, gates_TE.t().float().unsqueeze(-1), out=scratch)
    torch.mul(grad_act, silu, out=grad_up)
    dsilu = torch.sub(gate, silu, out=silu).add_(1).mul_(sig)  # silu' = sig·(1 + gate·(1 - sig))
    torch.mul(grad_act, up, out=grad_gate).mul_(dsilu)
    return grad_gate_up.to(gate_up_ETJ.dtype), grad_gates_TE


class _DenseSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH, use_triton):
        if use_triton:
            from .triton_swiglu import swiglu_scale
        else:
            swiglu_scale = _swiglu_scale_torch
        num_experts, inter, hidden = w_down_EIH.shape
        w_down_XH = w_down_EIH.reshape(num_experts * inter, hidden)
        y_blocks = [
            swiglu_scale(_each_expert(x_TH[rows], w_gate_up_EHJ), gates_TE[rows]) @ w_down_XH
            for rows in _token_blocks(x_TH.shape[0], x_TH.device)
        ]
        y_TH = y_blocks[0] if len(y_blocks) == 1 else torch.cat(y_blocks)
        ctx.save_for_backward(x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH)
        ctx.use_triton = use_triton
        return y_TH

    @staticmethod
    def backward(ctx, grad_y_TH):
        x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH = ctx.saved_tensors
        num_experts, inter, hidden = w_down_EIH.shape
        grad_y_TH = grad_y_TH.to(x_TH.dtype)
        grad_gates_TE = torch.empty(gates_TE.shape, device=gates_TE.device, dtype=torch.float32)
        grad_x_TH = torch.empty_like(x_TH) if ctx.needs_input_grad[0] else None
        if ctx.use_triton:
            from .triton_swiglu import swiglu_scale_backward
        for rows in _token_blocks(x_TH.shape[0], x_TH.device):
            gate_up_ETJ = _each_expert(x_TH[rows], w_gate_up_EHJ)  # recomputed: the largest activation
            if ctx.use_triton:
                # d a as one GEMM, token-major [T, E, I]: the layout the fused kernel reads
                grad_a_TEI = (grad_y_TH[rows] @ w_down_EIH.reshape(-1, hidden).t()).view(-1, num_experts, inter)
                grad_gate_up_ETJ, grad_gates_TE[rows] = swiglu_scale_backward(gate_up_ETJ, gates_TE[rows], grad_a_TEI)
            else:
                # d a as a batched GEMM, expert-major [E, T, I] like gate_up (faster on CPU than the one GEMM)
                grad_a_ETI = _each_expert(grad_y_TH[rows], w_down_EIH.transpose(1, 2))
                grad_gate_up_ETJ, grad_gates_TE[rows] = _swiglu_scale_backward_torch(
                    gate_up_ETJ, gates_TE[rows], grad_a_ETI
                )
            if grad_x_TH is not None:
                grad_x_ETH = torch.bmm(grad_gate_up_ETJ, w_gate_up_EHJ.transpose(1, 2))
                grad_x_TH[rows] = grad_x_ETH.sum(0, dtype=torch.float32)
        return grad_x_TH, grad_gates_TE.to(gates_TE.dtype), None, None, None


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
