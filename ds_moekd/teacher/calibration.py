"""Where a balanced expert placement's loads come from (docs/parallelism.md, "Expert placement").

`teacher.expert_placement` (ds_moekd/config.py) names the source: `contiguous` (nothing to do),
`balanced` (a short no-grad calibration pass of native top-k routing over the first micro-batches,
its per-expert counts summed over every rank so that all ranks pack the same placement), or a
JSON file of loads written by `save_loads` (e.g. `ds-moekd bench placement --save-loads`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ds_moekd.runtime.dist import all_reduce_sum
from ds_moekd.teacher.model import MoETeacher
from ds_moekd.teacher.placement import balanced_placement, imbalance, rank_loads, read_loads
from ds_moekd.teacher.routing import NativeTopK

logger = logging.getLogger(__name__)

CALIBRATION_BATCHES = 4  # micro-batches per rank of the calibration pass (`balanced`)


def measure_expert_loads(teacher: MoETeacher, batches: Iterable[dict], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Per MoE layer, the assignments native top-k routing gives each expert over the real tokens of
    `batches` (the teacher's keyword inputs: input_ids, attention_mask or position_ids), summed over
    the ranks of `group`: `[MoE layers, N]` int64 on the CPU. Collective: every rank of `group` calls
    it, each with its own batches, all with the same number of them."""
    device = teacher.get_output_embeddings().weight.device
    loads_LN = torch.zeros(len(teacher.moe_blocks), teacher.num_experts, dtype=torch.long, device=device)
    no_logits = torch.empty(0, dtype=torch.long, device=device)
    with torch.no_grad():
        for inputs in batches:
            out = teacher(**inputs, routing=NativeTopK(), return_gate_diagnostics=True, logits_to_keep=no_logits)
            loads_LN += torch.stack([d.load_N for d in out.gate_diagnostics]).to(device)
    return all_reduce_sum(loads_LN, group).cpu()


def apply_expert_placement(teacher: MoETeacher, setting: str, redundant: int = 0,
                           calibration: Iterable[dict] = ()) -> torch.Tensor | None:
    """Place the teacher's experts as `teacher.expert_placement` = `setting` asks, with `redundant`
    replica slots per rank; `calibration`: this rank's micro-batches for `balanced` (collective over
    the world, see `measure_expert_loads`). Returns the loads packed by (None: contiguous, or EP 1,
    where there is nothing to place)."""
    if setting == "contiguous" or teacher.ep_size == 1:
        return None
    if setting == "balanced":
        loads_LN = measure_expert_loads(teacher, calibration, teacher.groups.world_group)
    else:
        loads_LN = torch.tensor(read_loads(setting))
    placement = balanced_placement(loads_LN.tolist(), teacher.ep_size, redundant)
    logger.info(
        "expert placement %s (%d redundant slots per rank): heaviest EP rank over the mean, by these loads, "
        "%.3f as loaded -> %.3f", setting, redundant, imbalance(rank_loads(teacher.placement, loads_LN.tolist())),
        imbalance(rank_loads(placement, loads_LN.tolist())),
    )
    if placement != teacher.placement:
        teacher.place_experts(placement)
    return loads_LN
