"""What the student's ZeRO-3 partitioning asks of the rest of the project, in one module.

ZeRO-3 keeps a slice of each parameter per rank. Whoever needs whole weights gathers them here:
rollouts (`whole_student`, docs/rollouts.md), the exported and validated student
(`gathered_parameters`), SAR's copy of the lm_head (`gathered_head_weight`) and the fused loss
head (`register_external_weight`). The engine's ZeRO-3 tuning lives here too: whole decoder layers
as the unit of fetching (`fetch_whole_layers`), one exchange for the persistent parameters after
each step (`coalesce_persistent_gather`), and torch's `F.linear` for forwards without autograd
(`torch_linear`); docs/scale-out.md measures each. DeepSpeed is imported on use only: decoding and
the teacher run without it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether `module`'s parameters are ZeRO-3 partitions (a ZeRO-3 engine's module)."""
    return hasattr(next(module.parameters()), "ds_id")


def partitioned_parameters(params) -> list:
    """The ZeRO-3 parameters a `GatheredParameters` context needs: all but the persistent ones that
    are whole on this rank already (a persistent parameter is fetched at its first forward, so
    before the first step it may still be partitioned). Leaving a `GatheredParameters` context
    partitions every parameter it holds, persistent ones included (DeepSpeed 0.19), and a persistent
    parameter is not whole again until the step's end: the next forward and backward would fetch
    each small parameter one all-gather at a time."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if not (getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE)]


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module):
    """Inside: every parameter of `module` whole on every rank (all ranks enter: the gather is
    collective); nothing happens for a module that is not partitioned."""
    partitioned = partitioned_parameters(module.parameters())
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def gathered_head_weight(module: torch.nn.Module, vocab: int) -> torch.Tensor:
    """A detached copy of the first `vocab` rows of `module`'s lm_head weight (all ranks call)."""
    head = module.get_output_embeddings()
    with gathered_parameters(head):
        return head.weight[:vocab].detach().clone()


@contextlib.contextmanager
def whole_student(engine):
    """The ZeRO-3 student gathered whole, its ZeRO-3 hooks off. DeepSpeed's own
    `unwrap_model_for_generation` leaves the top module's start-of-forward hook on; until ZeRO has
    traced a full step that hook checks the module order across ranks (a collective), which ranks
    decoding different numbers of steps would deadlock on. So it comes off too, and goes back first,
    in its original order."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    module = offload.module
    with gathered_parameters(module):
        start_of_forward = module._forward_pre_hooks[offload.fwd_pre_hook.id]
        offload.fwd_pre_hook.remove()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload.fwd_pre_hook = module.register_forward_pre_hook(start_of_forward)
            offload._register_deepspeed_module(module)


def register_external_weight(module: torch.nn.Module, weight: torch.nn.Parameter) -> None:
    """Let `module` use another module's `weight` in its forward: ZeRO-3 then gathers the weight for
    that forward and its backward (an *external parameter*); without ZeRO-3 this does nothing."""
    from deepspeed.runtime.zero import register_external_parameter

    register_external_parameter(module, weight)


def fetch_whole_layers(model) -> None:
    """Make ZeRO-3 fetch, release and hook each decoder layer as one unit (DeepSpeed's "leaf
    modules"), as FSDP wraps per layer, rather than each of its ~10 submodules. Every hooked module
    costs Python work in the forward and the backward; on the demo's 2-layer student that was a
    third of the student step (docs/scale-out.md). The layer classes are the model's
    `_no_split_modules`, the unit transformers keeps whole on one device."""
    from deepspeed.utils import set_z3_leaf_modules

    layer_classes = list(getattr(model, "_no_split_modules", None) or [])
    if layer_classes:
        set_z3_leaf_modules(model, layer_classes, raise_if_not_found=False)


# One all-gather, not one per parameter, for the persistent parameters after each step.
# ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` whole on every rank through
# forward and backward, but its optimizer updates only this rank's partition of each; after the
# step (DeepSpeed's `_post_step`) it gathers them back with one collective per parameter. A small
# student is all persistent parameters (the demo's 21), so that was 21 blocking exchanges per
# step, ~14 ms of the demo's ~110 ms step on 2 CPU ranks (docs/scale-out.md, "Where the time
# goes"). Here every partition of a process group goes into one buffer and one all-gather, and each
# parameter is rebuilt from the ranks' slices: the same bytes, in one exchange.


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


@contextlib.contextmanager
def torch_linear():
    """Inside: torch's `F.linear` when autograd is off and ZeRO-3 has replaced it; else unchanged.

    Building a ZeRO-3 model (`deepspeed.zero.Init`, which transformers enters to load the student)
    swaps `torch.nn.functional.linear` process-wide for DeepSpeed's autograd function, whose
    backward can re-gather a weight that was partitioned after the forward. A forward without
    autograd (teacher forwards, decoding) never runs that backward, yet pays a Python autograd
    function per linear call, and the teacher is not a ZeRO-3 model at all; those forwards run with
    torch's own (docs/scale-out.md, "The changes behind these figures"). With autograd on it stays:
    a checkpointed layer must recompute with the same function."""
    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init
    except ImportError:  # DeepSpeed absent: nothing replaced F.linear
        yield
        return
    original, current = getattr(Init, "linear_bk", None), F.linear
    if original is None or current is original or torch.is_grad_enabled():
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = current


def partitioned_parameter_counts(engine) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model); ZeRO-3 keeps only a partition."""
    local = total = 0
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total
