"""The expert-parallel MoE block that replaces a family's sparse MoE block in the teacher.

It holds the replicated router (and shared experts, where the family has them) and only the
experts of this rank's slots in the layer's placement (ds_moekd/teacher/placement.py; by default
the contiguous block N/E_p·r ..). transformers' decoder layer calls `mlp(hidden_states)` with
nothing else, so the routing policy and per-token keys of the current forward are set on the
block by `MoETeacher.forward` (`active`) rather than passed as arguments.

Dispatch (`takes_dense_path`, the one dense/sparse rule): a policy choosing more than half of the
experts per token (ALL, KA with K = N-1, SAR) runs the dense all-gather/reduce-scatter path;
at most half (native top-k), the sparse path: an all-to-all, or for small payloads with EP <= K a
gathered all-gather/reduce-scatter (dispatch.py). Training and `ds-moekd bench moe-layer|teacher|ka`
run this block.

Only real tokens are routed: padding positions feed no real token (attention masks them as keys,
and their own outputs are never read), so their router, expert and exchange work is skipped and
their MoE output is zero (docs/teacher.md, "Only real tokens are routed").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ds_moekd.kernels import dense_experts, grouped_experts
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.rng import NOISE_SLOT_BASE, CounterKey, counter_normal
from ds_moekd.teacher.dense_dispatch import dispatch_dense, ep_max_tokens, takes_dense_path
from ds_moekd.teacher.diagnostics import GateDiagnostics, gate_diagnostics
from ds_moekd.teacher.dispatch import dispatch_sparse, gathered_fits
from ds_moekd.teacher.placement import RankSlots, SlotMap, contiguous_slots
from ds_moekd.teacher.routing import RouterSpec, RoutingContext, RoutingPolicy

logger = logging.getLogger(__name__)


@dataclass
class ActiveRouting:
    """Routing of one teacher forward: the policy and the keys of each real token (T: the real
    tokens, in flattened batch order)."""

    policy: RoutingPolicy
    sequence_T: torch.Tensor
    position_T: torch.Tensor
    draw_T: torch.Tensor
    # Where the real tokens sit in the flattened batch; None when every position is real.
    real_T: torch.Tensor | None = None
    diagnostics: list[GateDiagnostics] | None = None  # filled in layer order when not None
    # Per layer, each expert's router probability summed over real tokens `[N]` (SAR's balance
    # loss), differentiable; filled in layer order when not None.
    importance: list[torch.Tensor] | None = None
    # (seed, step) of the gate noise in train mode (families with noisy gates, SAR's router step)
    noise_key: tuple[int, int] | None = None
    # The most tokens any rank of the EP group holds in this forward: the same for every MoE layer,
    # so the first layer finds it (one all-reduce) and the others reuse it.
    ep_max_tokens: int | None = None


class ExpertParallelMoE(nn.Module):
    def __init__(
        self,
        *,
        layer_index: int,
        router: RouterSpec,
        gate: nn.Module,
        w_gate_up_EHJ: torch.Tensor,
        w_down_EIH: torch.Tensor,
        groups: ParallelGroups,
        slots: RankSlots | None = None,
        shared_expert: tuple[str, nn.Module] | None = None,
        shared_expert_gate: tuple[str, nn.Module] | None = None,
        checkpoint_prefix: str = "",
    ):
        super().__init__()
        self.layer_index = layer_index
        self.checkpoint_prefix = checkpoint_prefix  # the block's tensor names in the checkpoint start here
        self.router = router
        self.groups = groups
        self.gate = gate  # replicated router module (checkpoint names under `gate.`)
        self.hold_experts(slots or contiguous_slots(router.num_experts, groups.ep_size), w_gate_up_EHJ, w_down_EIH)
        # Shared experts keep transformers' module and attribute name, so checkpoint names match.
        self._shared_name = None if shared_expert is None else shared_expert[0]
        self._shared_gate_name = None if shared_expert_gate is None else shared_expert_gate[0]
        for pair in (shared_expert, shared_expert_gate):
            if pair is not None:
                self.add_module(*pair)
        self.active: ActiveRouting | None = None
        # Assignments each local slot computed in the last forward (all EP ranks' tokens);
        # for routing diagnostics, tests and `ds-moekd bench placement`.
        self.last_load_E: torch.Tensor | None = None
        self._logged_paths: set[tuple[str, int]] = set()  # (exchange, experts per token) logged once each

    def hold_experts(self, slots: RankSlots, w_gate_up_EHJ: torch.Tensor, w_down_EIH: torch.Tensor) -> None:
        """Hold the weights of this rank's slots, `slots[ep_rank]` in slot order, of the layer's
        placement `slots` (the experts in every EP rank's slots, ds_moekd/teacher/placement.py)."""
        if len(slots) != self.groups.ep_size or w_gate_up_EHJ.shape[0] != len(slots[self.groups.ep_rank]):
            raise ValueError(f"MoE layer {self.layer_index}: {w_gate_up_EHJ.shape[0]} expert weights for a placement "
                             f"over {len(slots)} ranks {[list(s) for s in slots]} at EP size {self.groups.ep_size}")
        self.slots = slots
        self.expert_ids = slots[self.groups.ep_rank]  # the expert in each local slot
        self.w_gate_up_EHJ = nn.Parameter(w_gate_up_EHJ, requires_grad=False)
        self.w_down_EIH = nn.Parameter(w_down_EIH, requires_grad=False)
        self.slot_map = SlotMap.of(slots, self.router.num_experts, w_gate_up_EHJ.device)
        # The dense path runs the primary slots only: each expert once in the EP group, N/E_p per rank.
        self._primaries = self.router.num_experts // self.groups.ep_size
        self._primary_ids = torch.tensor(self.expert_ids[: self._primaries], device=w_gate_up_EHJ.device)

    @property
    def gate_weight_NH(self) -> torch.Tensor:
        """The linear router's weight (families with a single-matrix router)."""
        return self.gate.weight

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            raise RuntimeError(
                f"ExpertParallelMoE (layer {self.layer_index}) called outside MoETeacher.forward: "
                "call the teacher, not its inner transformers model, so a routing policy is set"
            )
        active = self.active
        x_PH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])  # every position, padding included
        x_TH = x_PH if active.real_T is None else x_PH.index_select(0, active.real_T)
        logits_TN = self._gate_logits(x_TH, active)
        router = self.router.for_layer(getattr(self.gate, "e_score_correction_bias", None))
        context = RoutingContext(self.layer_index, active.sequence_T, active.position_T, active.draw_T)
        expert_ids_TK, weights_TK = active.policy.route(logits_TN, router, context)
        if active.importance is not None:
            active.importance.append(router.probabilities(logits_TN).float().sum(dim=0))
        if active.diagnostics is not None:
            active.diagnostics.append(gate_diagnostics(self.layer_index, logits_TN, router, expert_ids_TK))
        if self.groups.ep_size > 1 and active.ep_max_tokens is None:
            active.ep_max_tokens = ep_max_tokens(x_TH.shape[0], self.groups.ep_group, x_TH.device)
        if takes_dense_path(expert_ids_TK.shape[1], router.num_experts):
            self._log_path("dense all-gather/reduce-scatter", expert_ids_TK.shape[1], router.num_experts)
            gate_weights_TN = torch.zeros_like(logits_TN, dtype=weights_TK.dtype).scatter(
                1, expert_ids_TK, weights_TK
            )
            out_TH, self.last_load_E = dispatch_dense(
                x_TH,
                gate_weights_TN,
                ep_size=self.groups.ep_size,
                ep_rank=self.groups.ep_rank,
                ep_group=self.groups.ep_group,
                expert_ffn=self._local_experts_dense,
                max_tokens=active.ep_max_tokens,
                experts=self._primary_ids,
            )
        else:
            if logits_TN.requires_grad:
                raise RuntimeError(
                    f"MoE layer {self.layer_index}: router gradients need the dense dispatch (a policy that "
                    f"uses more than half of the {router.num_experts} experts, e.g. AllExperts); the sparse "
                    "all-to-all path has no backward"
                )
            gathered = gathered_fits(x_TH, expert_ids_TK.shape[1], self.groups.ep_size, active.ep_max_tokens)
            self._log_path("sparse all-gather/reduce-scatter" if gathered else "sparse all-to-all",
                           expert_ids_TK.shape[1], router.num_experts)
            out_TH, self.last_load_E = dispatch_sparse(
                x_TH,
                expert_ids_TK,
                weights_TK,
                num_experts=router.num_experts,
                ep_size=self.groups.ep_size,
                ep_group=self.groups.ep_group,
                expert_ffn=self._local_experts_grouped,
                ep_rank=self.groups.ep_rank,
                max_tokens=active.ep_max_tokens,
                slot_map=self.slot_map,
            )
        if self._shared_name is not None:
            shared_TH = getattr(self, self._shared_name)(x_TH)
            if self._shared_gate_name is not None:
                shared_TH = torch.sigmoid(getattr(self, self._shared_gate_name)(x_TH)) * shared_TH
            out_TH = out_TH + shared_TH
        if active.real_T is not None:  # padding positions get zeros
            out_TH = x_PH.new_zeros(x_PH.shape).index_copy(0, active.real_T, out_TH)
        return out_TH.view_as(hidden_BSH)

    def _gate_logits(self, x_TH: torch.Tensor, active: ActiveRouting) -> torch.Tensor:
        """Router logits; in train mode a noisy gate (LLaMA-MoE) adds noise drawn from counter-based
        normals keyed like the routing (ds_moekd/runtime/rng.py), so it does not depend on batching or EP size,
        and activation checkpointing recomputes the same noise."""
        if not (self.training and getattr(self.gate, "weight_noise", None) is not None and active.noise_key):
            return self.gate(x_TH)
        seed, step = active.noise_key
        key = CounterKey(NOISE_SLOT_BASE - self.layer_index, active.sequence_T, active.position_T, active.draw_T)
        normal_TN = counter_normal(seed, step, key, streams=self.router.num_experts).to(x_TH.dtype)
        return self.gate(x_TH, normal_TN)

    def _local_experts_grouped(self, x_RH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x_RH, tokens_per_expert_E, self.w_gate_up_EHJ, self.w_down_EIH)

    def _local_experts_dense(self, x_RH: torch.Tensor, gate_weights_RE: torch.Tensor) -> torch.Tensor:
        primary = self._primaries
        return dense_experts(x_RH, gate_weights_RE, self.w_gate_up_EHJ[:primary], self.w_down_EIH[:primary])

    def _log_path(self, path: str, experts_per_token: int, num_experts: int) -> None:
        if (path, experts_per_token) not in self._logged_paths:
            self._logged_paths.add((path, experts_per_token))
            logger.info("MoE layer %d: %s dispatch for %d of %d experts per token, ds_moekd.kernels experts",
                        self.layer_index, path, experts_per_token, num_experts)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_index}, experts={list(self.expert_ids)} of {self.router.num_experts}, "
            f"top_k={self.router.top_k}, ep_size={self.groups.ep_size}"
        )
