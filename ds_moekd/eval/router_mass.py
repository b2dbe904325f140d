"""Routing diagnostics of a MoE teacher: per layer, the router probability mass on non-activated experts.

Native top-k routing uses only the k most probable experts; the rest of the router's probability
(`1 - sum of the native top-k probabilities`) is the knowledge that ALL/KA/SAR reach. Measured on
the evaluation prompts (teacher-forced) by the `MoETeacher`'s own gate diagnostics, which count
real tokens only and know every family's router (bias, group limits, LLaMA-MoE's gates).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_moekd.decoding import group_max, left_pad


def _prompt_diagnostics(teacher, prompts: list[list[int]], keys: list[int], pad_token_id: int, batch_size: int,
                        routing, lockstep_group):
    """Teacher-forced forwards over the prompts in batches; yields each batch's per-layer diagnostics.
    Under EP (`lockstep_group`) all ranks run the same number of forwards (an empty rank a dummy one,
    whose diagnostics are not yielded)."""
    device = next(teacher.parameters()).device
    n_batches = group_max(-(-len(prompts) // batch_size), lockstep_group, device)
    for b in range(n_batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        ids, mask = left_pad(prompts[rows] or [[pad_token_id]], pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate does for left padding
        out = teacher(ids, mask, position_ids, routing=routing, return_gate_diagnostics=True,
                      sequence_index=torch.tensor(keys[rows] or [-1], device=device))
        if prompts[rows]:
            yield out.gate_diagnostics


@torch.no_grad()
def non_activated_gate_mass(teacher, prompts: list[list[int]], keys: list[int], pad_token_id: int, *,
                            batch_size: int = 16, routing=None, world_group=None, lockstep_group=None) -> dict:
    """Mean non-activated router mass per MoE layer over every prompt token of every rank.

    `keys`: the prompts' global indices (KA routing draws are keyed by them, as in decoding).
    """
    device = next(teacher.parameters()).device
    layers = len(teacher.moe_blocks)
    sums = torch.zeros(layers + 1, dtype=torch.float64, device=device)  # per-layer mass sums, then the token count
    for diagnostics in _prompt_diagnostics(teacher, prompts, keys, pad_token_id, batch_size, routing, lockstep_group):
        for layer, diag in enumerate(diagnostics):
            sums[layer] += diag.unrouted_mass_sum
        sums[-1] += diagnostics[0].tokens
    if world_group is not None:
        dist.all_reduce(sums, group=world_group)
    tokens = int(sums[-1])
    router = teacher.family.router_spec(teacher.config)
    return {"non_activated_gate_mass": [round(float(s) / max(1, tokens), 6) for s in sums[:-1]],
            "tokens": tokens, "top_k": router.top_k, "num_experts": router.num_experts}


@torch.no_grad()
def router_distributions(teacher, prompts: list[list[int]], pad_token_id: int, *, batch_size: int = 16
                         ) -> list[torch.Tensor]:
    """Per MoE layer, the router's distribution over all experts for every real prompt token, in
    prompt order ([tokens, N]; one process). Two teachers that differ only in their routers give
    row-aligned tensors, so their distributions can be compared token by token."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in teacher.moe_blocks]
    keys = list(range(len(prompts)))
    for diagnostics in _prompt_diagnostics(teacher, prompts, keys, pad_token_id, batch_size, None, None):
        for layer, diag in enumerate(diagnostics):
            per_layer[layer].append(diag.probabilities_TN)
    return [torch.cat(chunks) for chunks in per_layer]
