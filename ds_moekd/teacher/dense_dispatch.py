"""Dense expert-parallel dispatch for routing that uses (nearly) every expert: ALL, SAR, KA.

Every token needs most experts, so instead of an all-to-all per assignment the EP group
all-gathers its tokens and their gate weights, every rank runs its local experts on all of them
as dense GEMMs (a dropped expert is a zero weight), and a reduce-scatter sums the weighted
outputs back to the tokens' home ranks. Ranks may hold different token counts (ragged on-policy
batches): each pads to the group maximum with zero rows, whose zero gate weights contribute
nothing. The maximum is the same for every MoE layer of a forward, so the teacher finds it once
per forward (`ep_max_tokens`) and hands it in; tokens and gate weights travel in one all-gather
when they share a dtype, so a layer makes two collectives. Both collectives are autograd
functions (the backward of an all-gather is a reduce-scatter and vice versa), so SAR's router
gradient flows through them. Memory is O(E_p * T_max * (H + N)) plus the expert FFN's own
activations: linear in tokens, no tokens x tokens x experts mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ds_moekd.runtime.dist import reduce_scatter_sum

# (all tokens [R, H], their gate weights for the local experts [R, E_local]) -> weighted sum [R, H]
DenseExpertFFN = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _AllGatherPadded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, max_tokens, ep_size, group):
        ctx.tokens, ctx.max_tokens, ctx.ep_size, ctx.group = x_TD.shape[0], max_tokens, ep_size, group
        padded_MD = x_TD.new_zeros(max_tokens, x_TD.shape[1])
        padded_MD[: x_TD.shape[0]] = x_TD
        gathered_RD = x_TD.new_empty(ep_size * max_tokens, x_TD.shape[1])
        dist.all_gather_into_tensor(gathered_RD, padded_MD, group=group)
        return gathered_RD

    @staticmethod
    def backward(ctx, grad_RD):
        grad_MD = grad_RD.new_empty(ctx.max_tokens, grad_RD.shape[1])
        reduce_scatter_sum(grad_MD, grad_RD, ctx.group)
        return grad_MD[: ctx.tokens], None, None, None


class _ReduceScatterPadded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, tokens, max_tokens, ep_size, group):
        ctx.tokens, ctx.max_tokens, ctx.ep_size, ctx.group = tokens, max_tokens, ep_size, group
        mine_MD = y_RD.new_empty(max_tokens, y_RD.shape[1])
        reduce_scatter_sum(mine_MD, y_RD, group)
        return mine_MD[:tokens]

    @staticmethod
    def backward(ctx, grad_TD):
        padded_MD = grad_TD.new_zeros(ctx.max_tokens, grad_TD.shape[1])
        padded_MD[: ctx.tokens] = grad_TD
        grad_RD = grad_TD.new_empty(ctx.ep_size * ctx.max_tokens, grad_TD.shape[1])
        dist.all_gather_into_tensor(grad_RD, padded_MD, group=ctx.group)
        return grad_RD, None, None, None, None


def takes_dense_path(experts_per_token: int, num_experts: int) -> bool:
    """The one rule for the MoE block's dispatch (docs/teacher.md, "Dispatch"): dense once a token
    uses more than half of the experts, else sparse. At exactly half the sparse path computes half
    the dense path's expert FLOPs, and measured 1.9-2.1x faster on CPU (docs/kernels.md)."""
    return 2 * experts_per_token > num_experts


def ep_max_tokens(tokens: int, ep_group: dist.ProcessGroup | None, device: torch.device) -> int:
    """The most tokens any rank of the EP group holds (one all-reduce; every rank must call it)."""
    max_tokens_1 = torch.tensor([tokens], device=device)
    dist.all_reduce(max_tokens_1, op=dist.ReduceOp.MAX, group=ep_group)
    return int(max_tokens_1.item())


def dispatch_dense(
    x_TH: torch.Tensor,
    gate_weights_TN: torch.Tensor,
    *,
    ep_size: int,
    ep_rank: int,
    ep_group: dist.ProcessGroup | None,
    expert_ffn: DenseExpertFFN,
    max_tokens: int | None = None,
    experts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_e g[t, e] * expert_e(x[t]) `[T, H]` for this rank's tokens, and this rank's expert load.

    `gate_weights_TN` holds every expert's weight (0 for an expert a token does not use); the
    load `[E_local]` counts the tokens (of all EP ranks) with a nonzero weight on each local expert.
    `experts`: the experts `expert_ffn` computes, in its order (None: the contiguous block
    ep_rank·N/E_p ..); the EP group's ranks together must compute each expert once.
    `max_tokens`: the most tokens any rank of the EP group holds (None: found here, one more collective).
    """
    num_experts = gate_weights_TN.shape[1]
    local = num_experts // ep_size
    columns = slice(ep_rank * local, (ep_rank + 1) * local) if experts is None else experts
    if ep_size == 1:
        gate_weights_TE = gate_weights_TN[:, columns]
        return expert_ffn(x_TH, gate_weights_TE), (gate_weights_TE != 0).sum(dim=0)
    tokens = x_TH.shape[0]
    if max_tokens is None:
        max_tokens = ep_max_tokens(tokens, ep_group, x_TH.device)
    if max_tokens == 0:  # no rank has tokens: nothing to exchange
        return x_TH.new_zeros(x_TH.shape), torch.zeros(local, dtype=torch.long, device=x_TH.device)
    # All N columns: each rank needs a different column slice of every rank's tokens; one gather serves all.
    if gate_weights_TN.dtype == x_TH.dtype:
        hidden = x_TH.shape[1]
        all_xg_RD = _AllGatherPadded.apply(torch.cat([x_TH, gate_weights_TN], dim=1), max_tokens, ep_size, ep_group)
        all_x_RH, all_g_RN = all_xg_RD[:, :hidden], all_xg_RD[:, hidden:]
    else:
        all_x_RH = _AllGatherPadded.apply(x_TH, max_tokens, ep_size, ep_group)
        all_g_RN = _AllGatherPadded.apply(gate_weights_TN, max_tokens, ep_size, ep_group)
    local_g_RE = all_g_RN[:, columns]
    partial_RH = expert_ffn(all_x_RH, local_g_RE)
    out_TH = _ReduceScatterPadded.apply(partial_RH, tokens, max_tokens, ep_size, ep_group)
    return out_TH, (local_g_RE != 0).sum(dim=0)
