"""Sparse expert-parallel dispatch for native top-k routing.

Each of the T tokens on this rank has K (expert, weight) assignments. The T*K assignments are
sorted by expert, mapped to the expert slots of the layer's placement (`SlotMap`,
ds_moekd/teacher/placement.py; by default expert e is slot e, on EP rank e // (N / E_p)), sent with
one uneven `all_to_all_single` to the ranks owning those slots, computed there grouped by local
slot, sent back with the reverse all-to-all and summed per token with their weights, a token's
experts in ascending expert order whatever the slots. Memory is O(T*K*H): no tokens x tokens x
experts mask. Token counts may differ between ranks, and be zero.

That is three blocking exchanges per MoE layer (the per-slot counts, the tokens, the outputs).
When the EP group is no larger than K (EP 2 with top-2), gathering every rank's tokens moves no
more rows than the all-to-all does (each rank's T tokens to each of the E_p - 1 others, against
T*K*(E_p-1)/E_p assignments), so `dispatch_gathered` does that instead: one all-gather of the
tokens with their expert ids and weights packed in (padded to the group's largest token count,
found once per teacher forward), each rank runs the assignments of its own slots, and one
reduce-scatter sums the weighted outputs back to the tokens' ranks: two exchanges per layer.
On each rank a token's experts are summed in ascending expert order either way (the gathered
path then adds the ranks' partial sums: at K >= 3 a placement that groups a token's experts
differently over the ranks rounds differently). It pays only while a layer's
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
from ds_moekd.teacher.placement import SlotMap, contiguous_slots

# The gathered path's limit on one rank's padded tokens (max tokens x hidden x element size).
GATHERED_MAX_BYTES = 256 * 1024

# (tokens grouped by local slot [R, H], tokens per local slot [S]) -> outputs [R, H]
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
    slot_map: SlotMap | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of each token's experts' outputs `[T, H]`, and this rank's load.

    The load `[S]` counts the assignments (from all EP ranks) each local slot computed. `slot_map`:
    the layer's placement (None: contiguous, expert e in slot e). With `max_tokens` (the most tokens
    any rank of the EP group holds in this forward), an EP group no larger than K and a small
    payload, the gathered path runs (module docstring); else the all-to-all.
    """
    slot_map = slot_map or SlotMap.of(contiguous_slots(num_experts, ep_size), num_experts, x_TH.device)
    top_k = expert_ids_TK.shape[1]
    if gathered_fits(x_TH, top_k, ep_size, max_tokens):
        return dispatch_gathered(x_TH, expert_ids_TK, weights_TK, slot_map=slot_map, ep_size=ep_size,
                                 ep_rank=ep_rank, ep_group=ep_group, expert_ffn=expert_ffn, max_tokens=max_tokens)
    flat_ids_A = expert_ids_TK.reshape(-1)
    # Stable sort keeps token order within an expert, so the combine below sums a token's
    # experts in ascending expert order, as transformers' expert loop does.
    order_A = torch.argsort(flat_ids_A, stable=True)
    slot_A = slot_map.slots_of(flat_ids_A[order_A])
    by_slot = None if slot_map.in_expert_order else torch.argsort(slot_A, stable=True)
    send_order = order_A if by_slot is None else order_A[by_slot]
    send_x_AH = x_TH.index_select(0, send_order // top_k)
    send_per_slot = torch.bincount(slot_A, minlength=ep_size * slot_map.slots_per_rank)

    if ep_size == 1:
        y_AH = expert_ffn(send_x_AH, send_per_slot)
        load_S = send_per_slot
    else:
        y_AH, load_S = _exchange_and_compute(send_x_AH, send_per_slot, ep_size, ep_group, expert_ffn)

    y_AH = y_AH if by_slot is None else _unsort(y_AH, by_slot)  # back to expert order
    weighted_AH = (y_AH.float() * weights_TK.reshape(-1)[order_A, None].float()).to(x_TH.dtype)
    out_TH = torch.zeros_like(x_TH)
    out_TH.index_add_(0, order_A // top_k, weighted_AH)
    return out_TH, load_S


def _unsort(rows_AH: torch.Tensor, order_A: torch.Tensor) -> torch.Tensor:
    """`rows_AH` were taken in `order_A`; put row i back at position order_A[i]."""
    return torch.empty_like(rows_AH).index_copy_(0, order_A, rows_AH)


def _exchange_and_compute(send_x_AH, send_per_slot, ep_size, ep_group, expert_ffn):
    local_slots = send_per_slot.numel() // ep_size
    # Per-slot counts go to the slots' owners: row r of the result is what rank r sends
    # to each of my local slots.
    recv_per_slot_RS = torch.empty_like(send_per_slot)
    dist.all_to_all_single(recv_per_slot_RS, send_per_slot, group=ep_group)
    recv_per_slot_RS = recv_per_slot_RS.view(ep_size, local_slots)
    send_splits = send_per_slot.view(ep_size, local_slots).sum(dim=1).tolist()
    recv_splits = recv_per_slot_RS.sum(dim=1).tolist()

    hidden = send_x_AH.shape[1]
    recv_x_RH = send_x_AH.new_empty(sum(recv_splits), hidden)
    dist.all_to_all_single(recv_x_RH, send_x_AH, recv_splits, send_splits, group=ep_group)

    # Received rows are ordered (source rank, local slot); the FFN wants them by local slot.
    local_slot_of_row = (
        torch.arange(local_slots, device=send_x_AH.device)
        .repeat(ep_size)
        .repeat_interleave(recv_per_slot_RS.reshape(-1))
    )
    by_slot = torch.argsort(local_slot_of_row, stable=True)
    load_S = recv_per_slot_RS.sum(dim=0)
    recv_y_RH = torch.empty_like(recv_x_RH)
    recv_y_RH[by_slot] = expert_ffn(recv_x_RH[by_slot], load_S)

    y_AH = send_x_AH.new_empty(send_x_AH.shape)
    dist.all_to_all_single(y_AH, recv_y_RH, send_splits, recv_splits, group=ep_group)
    return y_AH, load_S


def dispatch_gathered(
    x_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    slot_map: SlotMap,
    ep_size: int,
    ep_rank: int,
    ep_group: dist.ProcessGroup | None,
    expert_ffn: ExpertFFN,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dispatch_sparse` in two exchanges: all-gather tokens + routing, reduce-scatter outputs."""
    tokens, hidden = x_TH.shape
    top_k = expert_ids_TK.shape[1]
    local_slots = slot_map.slots_per_rank
    if max_tokens == 0:  # no rank has tokens
        return torch.zeros_like(x_TH), torch.zeros(local_slots, dtype=torch.long, device=x_TH.device)
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
    ids_A = meta_bytes[:, : 4 * top_k].contiguous().view(torch.int32).reshape(-1).long()
    w_A = meta_bytes[:, 4 * top_k:].contiguous().view(torch.float32).reshape(-1)

    # Every rank maps the whole group's assignments to slots (the same split of replicated experts
    # everywhere) and keeps its own, in expert order; within an expert, in row order. Padding (-1) sorts first.
    order_A = torch.argsort(ids_A, stable=True)[int((ids_A < 0).sum()):]
    local_slot_A = slot_map.slots_of(ids_A[order_A]) - ep_rank * local_slots
    mine_A = ((local_slot_A >= 0) & (local_slot_A < local_slots)).nonzero()[:, 0]
    assignment_A, local_slot_A = order_A[mine_A], local_slot_A[mine_A]
    by_slot = None if slot_map.in_expert_order else torch.argsort(local_slot_A, stable=True)
    ffn_order = assignment_A if by_slot is None else assignment_A[by_slot]
    load_S = torch.bincount(local_slot_A, minlength=local_slots)
    y_AH = expert_ffn(gathered_RD[ffn_order // top_k, :hidden], load_S)
    y_AH = y_AH if by_slot is None else _unsort(y_AH, by_slot)  # back to expert order
    row_of_A = assignment_A // top_k
    weighted_AH = (y_AH.float() * w_A[assignment_A, None]).to(x_TH.dtype)
    partial_RH = x_TH.new_zeros(ep_size * max_tokens, hidden)
    partial_RH.index_add_(0, row_of_A, weighted_AH)
    out_MH = reduce_scatter_sum(x_TH.new_empty(max_tokens, hidden), partial_RH, ep_group)
    return out_MH[:tokens], load_S
