"""Routing diagnostics of a MoE teacher: per layer, the router probability mass on non-activated experts.

Native top-k routing uses only the k most probable experts; the rest of the router's probability
(`1 - sum of the top-k probabilities`) is the knowledge that ALL/KA/SAR reach. Measured on the
evaluation prompts (teacher-forced, padding excluded), from each MoE block's input and router
weight, for transformers' own model and for the expert-parallel `MoETeacher` alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_moekd.eval.decode import left_pad
from ds_moekd.teacher.families import get_family


def _moe_blocks(model, family) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(block, router weight [N, H]) for every MoE block, in layer order."""
    from ds_moekd.teacher import MoETeacher

    if isinstance(model, MoETeacher):
        return [(b, b.gate_weight_NH) for b in model.moe_blocks]
    return [(m, m.get_parameter(family.router_weight_name)) for m in model.modules()
            if type(m).__name__ == family.sparse_block_class]


@torch.no_grad()
def non_activated_gate_mass(model, prompts: list[list[int]], pad_token_id: int, *, batch_size: int = 16,
                            routing=None, world_group=None, lockstep_group=None) -> dict:
    """Mean non-activated router mass per MoE layer over every prompt token of every rank.

    Under EP (`lockstep_group`) all ranks run the same number of forwards (an empty rank a dummy one).
    """
    from ds_moekd.teacher import MoETeacher

    family = get_family(model.config, "teacher")
    router = family.router_spec(model.config)
    blocks = _moe_blocks(model, family)
    sums = torch.zeros(len(blocks) + 1, dtype=torch.float64)  # per-layer mass sums, then the token count
    current_mask: list[torch.Tensor] = []

    def hook_for(layer: int, weight_NH: torch.Tensor):
        def hook(_module, args):
            x_TH = args[0].reshape(-1, args[0].shape[-1])
            probs_TN = router.probabilities(F.linear(x_TH, weight_NH))
            outside_T = 1 - probs_TN.topk(router.top_k, dim=-1).values.sum(-1)
            sums[layer] += float((outside_T.double() * current_mask[0]).sum())
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i, w)) for i, (block, w) in enumerate(blocks)]
    n_batches = -(-len(prompts) // batch_size)
    if lockstep_group is not None:
        t = torch.tensor([n_batches])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=lockstep_group)
        n_batches = int(t.item())
    device = next(model.parameters()).device
    try:
        for b in range(n_batches):
            rows = prompts[b * batch_size:(b + 1) * batch_size]
            ids, mask = left_pad(rows or [[pad_token_id]], pad_token_id)
            current_mask[:] = [mask.reshape(-1).double() * bool(rows)]  # a dummy batch counts nothing
            ids, mask = ids.to(device), mask.to(device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            extra = {"routing": routing} if isinstance(model, MoETeacher) else {}
            model(ids, attention_mask=mask, position_ids=position_ids, **extra)
            sums[-1] += float(current_mask[0].sum())
    finally:
        for h in handles:
            h.remove()
    if world_group is not None:
        dist.all_reduce(sums, group=world_group)
    tokens = int(sums[-1])
    return {"non_activated_gate_mass": [round(float(s) / max(1, tokens), 6) for s in sums[:-1]],
            "tokens": tokens, "top_k": router.top_k, "num_experts": router.num_experts}
