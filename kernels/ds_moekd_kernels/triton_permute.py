"""Triton row gather (permute) and weighted K-way row combine (un-permute)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gather_rows_kernel(x_ptr, index_ptr, out_ptr, H, stride_x, stride_out, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    src = tl.load(index_ptr + row).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        ok = cols < H
        tl.store(
            out_ptr + row.to(tl.int64) * stride_out + cols,
            tl.load(x_ptr + src * stride_x + cols, mask=ok),
            mask=ok,
        )


@triton.jit
def combine_rows_kernel(
    y_ptr,
    row_of_slot_ptr,
    weight_ptr,
    out_ptr,
    H,
    stride_y,
    stride_out,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(K):
        row = tl.load(row_of_slot_ptr + token * K + k).to(tl.int64)
        w = tl.load(weight_ptr + token * K + k).to(tl.float32)
        acc += w * tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def gather_rows(x_TH: torch.Tensor, index_R: torch.Tensor) -> torch.Tensor:
    x_TH = x_TH.contiguous()
    out = x_TH.new_empty(index_R.numel(), x_TH.shape[1])
    if out.numel():
        block = min(1024, triton.next_power_of_2(x_TH.shape[1]))
        gather_rows_kernel[(index_R.numel(),)](
            x_TH, index_R, out, x_TH.shape[1], x_TH.stride(0), out.stride(0), BLOCK_H=block
        )
    return out


def combine_rows(y_RH: torch.Tensor, row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    y_RH = y_RH.contiguous()
    tokens, top_k = row_of_slot_TK.shape
    out = y_RH.new_empty(tokens, y_RH.shape[1])
    if out.numel():
        block = min(1024, triton.next_power_of_2(y_RH.shape[1]))
        grid = (tokens, triton.cdiv(y_RH.shape[1], block))
        combine_rows_kernel[grid](
            y_RH,
            row_of_slot_TK.contiguous(),
            weights_TK.contiguous(),
            out,
            y_RH.shape[1],
            y_RH.stride(0),
            out.stride(0),
            K=top_k,
            BLOCK_H=block,
        )
    return out
