"""The MoE layer implementations `ds-moekd bench moe-layer` compares, each a callable `x_TH -> y_TH` on
the same weights (router `[N, H]`, experts `[N, H, 2I]`, `[N, I, H]`) and the same routing: ours is
the teacher's `ExpertParallelMoE` (what training runs), the baseline transformers' Mixtral block.
A builder raises NotMeasured with the reason when an implementation cannot run here."""

from __future__ import annotations

import torch
from torch import nn

from ds_moekd import kernels
from ds_moekd.kernels import unavailable_reason
from ds_moekd.teacher.moe_block import ExpertParallelMoE
from ds_moekd.teacher.routers import LinearRouter
from ds_moekd.teacher.routing import RouterSpec, RoutingContext

TRANSFORMERS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
# our layer with the expert backend forced (ds_moekd.kernels.configure), where it can run
FORCED_BACKENDS = ("torch_grouped_mm", "megablocks")


class NotMeasured(Exception):
    pass


def our_layer(preset, weights, groups) -> ExpertParallelMoE:
    """The teacher's MoE block holding this EP rank's experts, with a Mixtral router."""
    gate_NH, w_gate_up, w_down = weights
    local = preset.num_experts // groups.ep_size
    experts = range(groups.ep_rank * local, (groups.ep_rank + 1) * local)
    gate = LinearRouter(preset.num_experts, preset.hidden, fp32=False, correction_bias=False, dtype=gate_NH.dtype)
    gate.weight = nn.Parameter(gate_NH, requires_grad=False)
    return ExpertParallelMoE(
        layer_index=0,
        router=RouterSpec(num_experts=preset.num_experts, top_k=preset.top_k, renormalize=True),
        gate=gate,
        w_gate_up_EHJ=w_gate_up[experts.start : experts.stop].contiguous(),
        w_down_EIH=w_down[experts.start : experts.stop].contiguous(),
        groups=groups,
    ).eval()


class PolicyRouter(nn.Module):
    """transformers' router call `hidden -> (logits, weights, ids)`, routed by our block's policy."""

    def __init__(self, ours: ExpertParallelMoE):
        super().__init__()
        self.ours = ours

    def forward(self, x_TH):
        active = self.ours.active
        logits_TN = self.ours.gate(x_TH)
        context = RoutingContext(0, active.sequence_T, active.position_T, active.draw_T)
        ids_TK, weights_TK = active.policy.route(logits_TN, self.ours.router, context)
        return logits_TN, weights_TK.to(x_TH.dtype), ids_TK


def transformers_layer(preset, weights, k: int, ours: ExpertParallelMoE, implementation: str):
    """transformers' MixtralSparseMoeBlock (all N experts) with one of its experts implementations."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    _, w_gate_up, w_down = weights
    if implementation == "batched_mm" and w_gate_up.device.type == "cpu":
        raise NotMeasured("batched_mm is not run on CPU (unusably slow there, docs/kernels.md)")
    config = MixtralConfig(hidden_size=preset.hidden, intermediate_size=preset.inter,
                           num_local_experts=preset.num_experts, num_experts_per_tok=k)
    config._experts_implementation = implementation
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    block.experts.gate_up_proj = nn.Parameter(w_gate_up.transpose(1, 2).contiguous(), requires_grad=False)
    block.experts.down_proj = nn.Parameter(w_down.transpose(1, 2).contiguous(), requires_grad=False)
    block.gate = PolicyRouter(ours)
    block.eval()
    return lambda x_TH: block(x_TH[None])[0]


def _with_backend(backend: str, fn):
    """`fn` with the expert backend that "auto" resolves to forced (the run config's teacher.expert_backend)."""

    def run(*args):
        kernels.configure(expert_backend=backend)
        try:
            return fn(*args)
        finally:
            kernels.configure()

    return run


def forced_backend(ours, backend, device, dtype):
    """Our layer with `backend` as its expert backend, or NotMeasured when it cannot run here."""
    reason = unavailable_reason(backend, device, dtype)
    if reason:
        raise NotMeasured(reason)
    return _with_backend(backend, ours)
