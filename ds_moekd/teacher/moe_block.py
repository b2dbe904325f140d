"""The expert-parallel MoE block that replaces a family's sparse MoE block in the teacher.

It holds the replicated router and only this rank's experts. transformers' decoder layer calls
`mlp(hidden_states)` with nothing else, so the routing policy and per-token keys of the current
forward are set on the block by `MoETeacher.forward` (`active`) rather than passed as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_moekd.dist import ParallelGroups
from ds_moekd.kernels import grouped_swiglu_reference
from ds_moekd.routing import RouterSpec, RoutingContext, RoutingPolicy
from ds_moekd.teacher.dispatch import dispatch_sparse


@dataclass(frozen=True)
class ActiveRouting:
    """Routing of one teacher forward: the policy and each token's keys (flattened batch order)."""

    policy: RoutingPolicy
    sequence_T: torch.Tensor
    position_T: torch.Tensor


class ExpertParallelMoE(nn.Module):
    def __init__(
        self,
        *,
        layer_index: int,
        router: RouterSpec,
        gate_weight_NH: torch.Tensor,
        w_gate_up_EHJ: torch.Tensor,
        w_down_EIH: torch.Tensor,
        expert_ids: range,
        groups: ParallelGroups,
    ):
        super().__init__()
        self.layer_index = layer_index
        self.router = router
        self.expert_ids = expert_ids
        self.groups = groups
        self.gate_weight_NH = nn.Parameter(gate_weight_NH, requires_grad=False)  # replicated router
        self.w_gate_up_EHJ = nn.Parameter(w_gate_up_EHJ, requires_grad=False)
        self.w_down_EIH = nn.Parameter(w_down_EIH, requires_grad=False)
        self.active: ActiveRouting | None = None
        # Assignments each local expert computed in the last forward (all EP ranks' tokens);
        # for routing diagnostics and tests.
        self.last_load_E: torch.Tensor | None = None

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            raise RuntimeError(
                f"ExpertParallelMoE (layer {self.layer_index}) called outside MoETeacher.forward: "
                "call the teacher, not its inner transformers model, so a routing policy is set"
            )
        x_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        logits_TN = F.linear(x_TH, self.gate_weight_NH)
        context = RoutingContext(self.layer_index, self.active.sequence_T, self.active.position_T)
        expert_ids_TK, weights_TK = self.active.policy.route(logits_TN, self.router, context)
        out_TH, self.last_load_E = dispatch_sparse(
            x_TH,
            expert_ids_TK,
            weights_TK,
            num_experts=self.router.num_experts,
            ep_size=self.groups.ep_size,
            ep_group=self.groups.ep_group,
            expert_ffn=self._local_experts,
        )
        return out_TH.view_as(hidden_BSH)

    def _local_experts(self, x_RH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu_reference(x_RH, tokens_per_expert_E, self.w_gate_up_EHJ, self.w_down_EIH)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_index}, experts={self.expert_ids.start}..{self.expert_ids.stop - 1} "
            f"of {self.router.num_experts}, top_k={self.router.top_k}, ep_size={self.groups.ep_size}"
        )
