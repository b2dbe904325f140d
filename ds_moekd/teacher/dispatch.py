"""Sparse expert-parallel dispatch for native top-k routing.

Each of the T tokens on this rank has K (expert, weight) assignments. The T*K assignments are
sorted by expert, sent with one uneven `all_to_all_single` to the ranks owning those experts
(expert e lives on EP rank e // (N / E_p)), computed there grouped by local expert, sent back
with the reverse all-to-all and summed per token with their weights. Memory is O(T*K*H): no
tokens x tokens x experts mask. Token counts may differ between ranks, and be zero.

That is three blocking exchanges per MoE layer (the per-expert counts, the tokens, the outputs).
When the EP group is no larger than K (EP 2 with top-2), gathering every rank's tokens moves no
more rows than the all-to-all does (each rank's T tokens to each of the E_p - 1 others, against
T*K*(E_p-1)/E_p assignments), so `dispatch_gathered` does that instead: one all-gather of the
tokens with their expert ids and weights packed in (padded to the group's largest token count,
found once per teacher forward), each rank runs the assignments of its own experts, and one
reduce-scatter sums the weighted outputs back to the tokens' ranks: two exchanges per layer.
A token's experts are summed in ascending expert order either way. It pays only while a layer's
exchange is latency-bound: measured on 2 CPU ranks over gloo, one teacher forward interleaved
with the all-to-all's, it took 0.93x the time at the demo's size (~450 tokens x hidden 128 per
rank) but 1.10x at hidden 512, where the reduce-scatter moves and sums the whole padded buffer
(still ~1.0x with the cheaper gloo reduce-scatter of `ds_moekd.runtime.dist.reduce_scatter_sum`).
So it runs only for payloads up to `GATHERED_MAX_BYTES` per rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ds_moekd.runtime.dist import reduce_scatter_sum

# The gathered path's limit on one rank's padded tokens (max tokens x hidden x element size).
GATHERED_MAX_BYTES = 256 * 1024

# (tokens grouped by local expert [R, H], tokens per local expert [E_local]) -> outputs [R, H]
ExpertFFN = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gathered_fits(x_TH: torch.Tensor, top_k: int, ep_size: int, max_tokens: int | None) -> bool:
    """Whether `dispatch_sparse` takes the gathered path (module docstring)."""
    return (ep_size > 1 and max_tokens is not None and ep_size <= top_k
            and max_tokens * x_TH.shape[1] * x_TH.element_size() <= GATHERED_MAX_BYTES)


def dispatch_sparse(
    x_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    num_experts: int,
    ep_size: int,
    ep_group: dist.ProcessGroup | None,
    expert_ffn: ExpertFFN,
    ep_rank: int = 0,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of each token's experts' outputs `[T, H]`, and this rank's expert load.

    The load `[E_local]` counts the assignments (from all EP ranks) each local expert computed.
    With `max_tokens` (the most tokens any rank of the EP group holds in this forward), an EP
    group no larger than K and a small payload, the gathered path runs (module docstring); else
    the all-to-all.
    """
    top_k = expert_ids_TK.shape[1]
    if gathered_fits(x_TH, top_k, ep_size, max_tokens):
        return dispatch_gathered(x_TH, expert_ids_TK, weights_TK, num_experts=num_experts, ep_size=ep_size,
                                 ep_rank=ep_rank, ep_group=ep_group, expert_ffn=expert_ffn, max_tokens=max_tokens)
    flat_ids_A = expert_ids_TK.reshape(-1)
    # Stable sort keeps token order within an expert, so the combine below sums a token's
    # experts in ascending expert order, as transformers' expert loop does.
    order_A = torch.argsort(flat_ids_A, stable=True)
    token_of_A = order_A // top_k
    send_x_AH = x_TH.index_select(0, token_of_A)
    send_per_expert_N = torch.bincount(flat_ids_A, minlength=num_experts)

    if ep_size == 1:
        y_AH = expert_ffn(send_x_AH, send_per_expert_N)
        load_E = send_per_expert_N
    else:
        y_AH, load_E = _exchange_and_compute(send_x_AH, send_per_expert_N, ep_size, ep_group, expert_ffn)

    weighted_AH = (y_AH.float() * weights_TK.reshape(-1)[order_A, None].float()).to(x_TH.dtype)
    out_TH = torch.zeros_like(x_TH)
    out_TH.index_add_(0, token_of_A, weighted_AH)
    return out_TH, load_E


def _exchange_and_compute(send_x_AH, send_per_expert_N, ep_size, ep_group, expert_ffn):
    num_experts = send_per_expert_N.numel()
    local_experts = num_experts // ep_size
    # Per-expert counts go to the experts' owners: row r of the result is what rank r sends
    # to each of my local experts.
    recv_per_expert_RE = torch.empty_like(send_per_expert_N)
    dist.all_to_all_single(recv_per_expert_RE, send_per_expert_N, group=ep_group)
    recv_per_expert_RE = recv_per_expert_RE.view(ep_size, local_experts)
    send_splits = send_per_expert_N.view(ep_size, local_experts).sum(dim=1).tolist()
    recv_splits = recv_per_expert_RE.sum(dim=1).tolist()

    hidden = send_x_AH.shape[1]
    recv_x_RH = send_x_AH.new_empty(sum(recv_splits), hidden)
    dist.all_to_all_single(recv_x_RH, send_x_AH, recv_splits, send_splits, group=ep_group)

    # Received rows are ordered (source rank, local expert); the FFN wants them by local expert.
    local_expert_of_row = (
        torch.arange(local_experts, device=send_x_AH.device)
        .repeat(ep_size)
        .repeat_interleave(recv_per_expert_RE.reshape(-1))
    )
    by_expert = torch.argsort(local_expert_of_row, stable=True)
    load_E = recv_per_expert_RE.sum(dim=0)
    recv_y_RH = torch.empty_like(recv_x_RH)
    recv_y_RH[by_expert] = expert_ffn(recv_x_RH[by_expert], load_E)

    y_AH = send_x_AH.new_empty(send_x_AH.shape)
    dist.all_to_all_single(y_AH, recv_y_RH, send_splits, recv_splits, group=ep_group)
    return y_AH, load_E


def dispatch_gathered(
    x_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    num_experts: int,
    ep_size: int,
    ep_rank: int,
    ep_group: dist.ProcessGroup | None,
    expert_ffn: ExpertFFN,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dispatch_sparse` in two exchanges: all-gather tokens + routing, reduce-scatter outputs."""
    tokens, hidden = x_TH.shape
    top_k = expert_ids_TK.shape[1]
    local_experts = num_experts // ep_size
    first = ep_rank * local_experts
    if max_tokens == 0:  # no rank has tokens
        return torch.zeros_like(x_TH), torch.zeros(local_experts, dtype=torch.long, device=x_TH.device)
    # Routing rides along as raw bits in x's dtype: int32 ids then fp32 weights, exact in any dtype.
    # Padding rows get id -1, so no expert takes them.
    routing_bytes = torch.cat([expert_ids_TK.to(torch.int32).view(torch.uint8),
                               weights_TK.to(torch.float32).view(torch.uint8)], dim=1)
    packed_MD = x_TH.new_empty(max_tokens, hidden + routing_bytes.shape[1] // x_TH.element_size())
    packed_MD[:tokens, :hidden] = x_TH
    packed_MD[:tokens, hidden:] = routing_bytes.view(x_TH.dtype)
    if tokens < max_tokens:
        pad_bytes = packed_MD[tokens:, hidden:].view(torch.uint8)
        pad_bytes[:, : 4 * top_k] = torch.full((top_k,), -1, dtype=torch.int32, device=x_TH.device).view(torch.uint8)
        pad_bytes[:, 4 * top_k:] = 0
    gathered_RD = x_TH.new_empty(ep_size * max_tokens, packed_MD.shape[1])
    dist.all_gather_into_tensor(gathered_RD, packed_MD, group=ep_group)
    meta_bytes = gathered_RD[:, hidden:].contiguous().view(torch.uint8)
    ids_RK = meta_bytes[:, : 4 * top_k].contiguous().view(torch.int32)
    w_RK = meta_bytes[:, 4 * top_k:].contiguous().view(torch.float32)

    # This rank's assignments, grouped by local expert; within an expert, in token order.
    local_ids_A = ids_RK.reshape(-1).long() - first
    mine_A = ((local_ids_A >= 0) & (local_ids_A < local_experts)).nonzero()[:, 0]
    order = torch.argsort(local_ids_A[mine_A], stable=True)
    assignment_A = mine_A[order]
    expert_of_A = local_ids_A[assignment_A]
    row_of_A = assignment_A // top_k
    load_E = torch.bincount(expert_of_A, minlength=local_experts)
    y_AH = expert_ffn(gathered_RD[row_of_A, :hidden], load_E)
    weighted_AH = (y_AH.float() * w_RK.reshape(-1)[assignment_A, None]).to(x_TH.dtype)
    partial_RH = x_TH.new_zeros(ep_size * max_tokens, hidden)
    partial_RH.index_add_(0, row_of_A, weighted_AH)
    out_MH = reduce_scatter_sum(x_TH.new_empty(max_tokens, hidden), partial_RH, ep_group)
    return out_MH[:tokens], load_E
