"""Triton grouped GEMM: rows of group e (contiguous) times B[e], optionally with a fused SwiGLU.

The schedule is a flat list of row tiles, built on the device (no host sync on group sizes):
tile p belongs to the group whose cumulative tile count passes p. The grid is sized by an
upper bound (ceil(R / BLOCK_M) + E tiles) and surplus programs exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def grouped_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    tile_group_ptr,
    tile_row_ptr,
    group_end_ptr,
    num_tiles_ptr,
    N,
    K,
    n_up_offset,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    SWIGLU: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    group = tl.load(tile_group_ptr + tile).to(tl.int64)
    row_start = tl.load(tile_row_ptr + tile)
    row_end = tl.load(group_end_ptr + group)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_am
    b_group = b_ptr + group * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_tile = b_group + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc = tl.dot(a, tl.load(b_tile, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
        if SWIGLU:  # up columns sit n_up_offset columns to the right of the gate columns
            acc_up = tl.dot(
                a,
                tl.load(b_tile + n_up_offset * stride_bn, mask=b_mask, other=0.0),
                acc_up,
                input_precision=PRECISION,
            )
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    c = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tile_schedule(tokens_per_expert_E: torch.Tensor, num_rows: int, block_m: int):
    """(tile_group, tile_row_start, group_end, num_tiles, max_tiles) for row tiles of each group."""
    sizes = tokens_per_expert_E.to(torch.int64)
    group_end = torch.cumsum(sizes, 0)
    tiles = (sizes + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(num_rows, block_m) + sizes.numel()
    p = torch.arange(max_tiles, device=sizes.device)
    group = torch.searchsorted(tiles_end, p, right=True).clamp_(max=sizes.numel() - 1)
    first_tile = tiles_end[group] - tiles[group]
    row_start = group_end[group] - sizes[group] + (p - first_tile) * block_m
    return (
        group.to(torch.int32),
        row_start.to(torch.int32),
        group_end.to(torch.int32),
        tiles_end[-1:],
        max_tiles,
    )


def _blocks(num_rows: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): H100-sized tiles, shrunk for small problems."""
    block_m = 128 if num_rows >= 2048 else 64
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    return block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 128 else 4


def grouped_matmul(
    a_RK: torch.Tensor, b_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor, *, swiglu: bool = False
) -> torch.Tensor:
    """c[rows of e] = a[rows of e] @ b[e]; with swiglu, b holds [gate | up] and c = silu(a@gate)*(a@up).

    b may be any strided view (a transposed weight for the backward pass).
    """
    num_rows, k = a_RK.shape
    n = b_EKN.shape[2] // 2 if swiglu else b_EKN.shape[2]
    c = torch.empty(num_rows, n, device=a_RK.device, dtype=a_RK.dtype)
    if num_rows == 0:
        return c
    block_m, block_n, block_k, warps = _blocks(num_rows, n, k)
    tile_group, tile_row, group_end, num_tiles, max_tiles = tile_schedule(
        tokens_per_expert_E, num_rows, block_m
    )
    grid = (max_tiles, triton.cdiv(n, block_n))
    grouped_matmul_kernel[grid](
        a_RK,
        b_EKN,
        c,
        tile_group,
        tile_row,
        group_end,
        num_tiles,
        n,
        k,
        n,
        a_RK.stride(0),
        a_RK.stride(1),
        b_EKN.stride(0),
        b_EKN.stride(1),
        b_EKN.stride(2),
        c.stride(0),
        c.stride(1),
        SWIGLU=swiglu,
        PRECISION="ieee" if a_RK.dtype == torch.float32 else "tf32",  # fp32 stays fp32, as in torch
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=3,
    )
    return c
