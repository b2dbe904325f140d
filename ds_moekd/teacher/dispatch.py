"""Sparse expert-parallel dispatch for native top-k routing.

Each of the T tokens on this rank has K (expert, weight) assignments. The T*K assignments are
sorted by expert, sent with one uneven `all_to_all_single` to the ranks owning those experts
(expert e lives on EP rank e // (N / E_p)), computed there grouped by local expert, sent back
with the reverse all-to-all and summed per token with their weights. Memory is O(T*K*H): no
tokens x tokens x experts mask. Token counts may differ between ranks, and be zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# (tokens grouped by local expert [R, H], tokens per local expert [E_local]) -> outputs [R, H]
ExpertFFN = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dispatch_sparse(
    x_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    num_experts: int,
    ep_size: int,
    ep_group: dist.ProcessGroup | None,
    expert_ffn: ExpertFFN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of each token's experts' outputs `[T, H]`, and this rank's expert load.

    The load `[E_local]` counts the assignments (from all EP ranks) each local expert computed.
    """
    top_k = expert_ids_TK.shape[1]
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
