"""One all-gather, not one per parameter, for ZeRO-3's persistent parameters after each step.

ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` whole on every rank through
forward and backward, but its optimizer updates only this rank's partition of each; after the
step (DeepSpeed's `_post_step`) it gathers them back with one collective per parameter. A small
student is all persistent parameters (the demo's 21), so that was 21 blocking exchanges per
step, ~14 ms of the demo's ~110 ms step on 2 CPU ranks (docs/scale-out.md, "Where the time
goes"). Here every partition of a process group goes into one buffer and one all-gather, and each
parameter is rebuilt from the ranks' slices: the same bytes, in one exchange.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def coalesce_persistent_gather(optimizer) -> bool:
    """Make a DeepSpeed ZeRO-3 optimizer gather its persistent parameters in one exchange per
    process group after each step. False (nothing changed) when the optimizer is not ZeRO-3, has
    no persistent parameters, or keeps parameters on NVMe (DeepSpeed's own path fetches those)."""
    post_step = getattr(optimizer, "_post_step", None)
    persistent = getattr(optimizer, "persistent_parameters", None)
    if post_step is None or not persistent or getattr(optimizer, "params_in_nvme_and_cpu", False):
        return False

    def _post_step(timer_names):
        leftovers = gather_partitions(persistent)
        optimizer.persistent_parameters = leftovers  # what DeepSpeed still gathers itself (quantized)
        try:
            post_step(timer_names)
        finally:
            optimizer.persistent_parameters = persistent

    optimizer._post_step = _post_step
    return True


def gather_partitions(params: list) -> list:
    """Gather the partitioned ZeRO-3 parameters among `params` whole, one all-gather per (process
    group, dtype); returns those left to DeepSpeed (quantized partitions)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    buckets: dict[tuple, list] = {}
    leftovers = []
    for p in params:
        if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
            continue
        if hasattr(p.ds_tensor, "ds_quant_scale"):
            leftovers.append(p)
            continue
        buckets.setdefault((id(p.ds_process_group), p.ds_tensor.dtype), []).append(p)
    for bucket in buckets.values():
        _gather_bucket(bucket)
    return leftovers


def _gather_bucket(params: list) -> None:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    group = params[0].ds_process_group
    world = dist.get_world_size(group=group)
    sizes = [p.ds_tensor.numel() for p in params]  # partition sizes, padded alike on every rank
    # partitions offloaded to the host gather on the accelerator, where the whole parameters live (as DeepSpeed's own)
    device = get_accelerator().current_device_name()
    local_P = torch.cat([p.ds_tensor.reshape(-1).to(device) for p in params])
    gathered_WP = local_P.new_empty(world, local_P.numel())
    dist.all_gather_into_tensor(gathered_WP.view(-1), local_P, group=group)
    for p, slice_WS in zip(params, gathered_WP.split(sizes, dim=1), strict=True):
        # rank r's slice is elements [r*S, (r+1)*S) of the flat parameter; the tail is padding
        p.data = slice_WS.reshape(-1)[: p.ds_numel].view(p.ds_shape)
        p.ds_status = ZeroParamStatus.AVAILABLE
