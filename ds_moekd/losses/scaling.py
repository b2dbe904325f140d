"""Loss normalisation across data-parallel ranks and accumulation micro-steps (docs/methods.md).

Losses are means over the response tokens of the *whole* global batch (every rank, every
gradient-accumulation micro-step): each micro-step sums over its own tokens and divides by the
all-reduced global count. DeepSpeed divides the backward loss by the accumulation steps and
averages gradients over the data-parallel group; `backward_scale` undoes both, so a W-rank
step equals a 1-rank step on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ds_moekd.runtime.dist import ParallelGroups, all_reduce_sum


def global_token_count(loss_masks: Sequence[torch.Tensor], groups: ParallelGroups) -> float:
    # on the masks' device: NCCL reduces GPU tensors only
    count = torch.tensor([float(sum(m.sum().item() for m in loss_masks))], dtype=torch.float64,
                         device=loss_masks[0].device)
    all_reduce_sum(count, groups.dp_group)
    if count.item() == 0:
        raise ValueError("the global batch has no response tokens to train on")
    return float(count.item())


def backward_scale(groups: ParallelGroups, gradient_accumulation_steps: int) -> float:
    """Factor for the backward loss that cancels DeepSpeed's DP mean and its 1/GAS scaling."""
    return float(groups.dp_size * gradient_accumulation_steps)
