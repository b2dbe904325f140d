"""Token permute / un-permute around the sparse path.

`sort_by_expert` orders the T·K (token, slot) assignments by expert (stable, so tokens keep their
order inside a group); `permute_tokens` gathers the rows; `unpermute_tokens` sums each token's K
expert outputs with its routing weights (a gather per token, so no atomics and a fixed order).
Both are differentiable: in x, in the expert outputs and in the routing weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Permutation:
    source_token_R: torch.Tensor  # token of each permuted row
    row_of_slot_TK: torch.Tensor  # permuted row of each (token, slot)
    tokens_per_expert_E: torch.Tensor


def sort_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> Permutation:
    top_k = expert_ids_TK.shape[1]
    order_R = torch.argsort(expert_ids_TK.reshape(-1), stable=True)
    row_of_slot = torch.empty_like(order_R)
    row_of_slot[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    sizes = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)
    return Permutation(order_R // top_k, row_of_slot.view_as(expert_ids_TK), sizes)


def _gather_rows(x_TH, source_token_R, use_triton):
    if use_triton:
        from .triton_permute import gather_rows

        return gather_rows(x_TH, source_token_R)
    return x_TH.index_select(0, source_token_R)


def _combine(y_RH, row_of_slot_TK, weights_TK, use_triton):
    if use_triton:
        from .triton_permute import combine_rows

        return combine_rows(y_RH, row_of_slot_TK, weights_TK)
    gathered = y_RH[row_of_slot_TK].float()  # [T, K, H]
    return torch.einsum("tkh,tk->th", gathered, weights_TK.float()).to(y_RH.dtype)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, perm_source_R, row_of_slot_TK, use_triton):
        ctx.save_for_backward(row_of_slot_TK)
        ctx.use_triton = use_triton
        return _gather_rows(x_TH, perm_source_R, use_triton)

    @staticmethod
    def backward(ctx, grad_RH):
        (row_of_slot_TK,) = ctx.saved_tensors
        ones = torch.ones(row_of_slot_TK.shape, device=grad_RH.device, dtype=torch.float32)
        return _combine(grad_RH.contiguous(), row_of_slot_TK, ones, ctx.use_triton), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RH, row_of_slot_TK, weights_TK, use_triton):
        ctx.save_for_backward(y_RH, row_of_slot_TK, weights_TK)
        ctx.use_triton = use_triton
        return _combine(y_RH, row_of_slot_TK, weights_TK, use_triton)

    @staticmethod
    def backward(ctx, grad_TH):
        y_RH, row_of_slot_TK, weights_TK = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # row r = slot (t, k): grad_y[r] = w[t, k] * grad[t]
            grad_y = torch.empty_like(y_RH)
            grad_y[row_of_slot_TK.reshape(-1)] = (
                weights_TK.reshape(-1, 1).float() * grad_TH.float().repeat_interleave(weights_TK.shape[1], 0)
            ).to(y_RH.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = torch.einsum("tkh,th->tk", y_RH[row_of_slot_TK].float(), grad_TH.float()).to(
                weights_TK.dtype
            )
        return grad_y, None, grad_w, None


def permute_tokens(x_TH: torch.Tensor, perm: Permutation, *, use_triton: bool = False) -> torch.Tensor:
    """Rows of x in expert order: `[T·K, H]`."""
    return _Permute.apply(x_TH, perm.source_token_R, perm.row_of_slot_TK, use_triton)


def unpermute_tokens(
    y_RH: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor, *, use_triton: bool = False
) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * y[row of (t, k)], accumulated in fp32: `[T, H]`."""
    return _Unpermute.apply(y_RH, perm.row_of_slot_TK, weights_TK, use_triton)
