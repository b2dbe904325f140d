"""Responses sampled from the ZeRO-3 student (on-policy rollouts), in one of two modes (docs/rollouts.md).

  gather     every rank gathers the whole student once per rollout and decodes alone: the
             partitioned parameters are gathered and ZeRO-3's module hooks removed, and put back
             afterwards (as TRL's and DeepSpeed's unwrap for generation do). Fast; needs the full
             student to fit on one device for the rollout.
  layerwise  decode with the partitioned module itself: each forward gathers one layer's
             parameters at a time over the data-parallel group, so every rank must run the same
             number of forwards; ranks step in lockstep until all have finished.

Both give identical tokens: sampling is keyed by (seed, step, example id, position), ds_moekd/rng.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ds_moekd.decoding import cut_at_eos, decode_ids, left_pad
from ds_moekd.dist import ParallelGroups
from ds_moekd.rng import Sampling


@dataclass(frozen=True)
class RolloutSettings:
    max_new_tokens: int
    sampling: Sampling
    mode: str  # gather | layerwise
    seed: int
    eos_token_id: int
    pad_token_id: int
    vocab_limit: int  # the tokenizer's length


def is_zero3(engine) -> bool:
    return hasattr(next(engine.module.parameters()), "ds_id")


@contextlib.contextmanager
def generation_model(engine, mode: str, groups: ParallelGroups):
    """(model to decode with, lockstep group) for `mode`; restores training mode afterwards."""
    module = engine.module
    was_training = module.training
    module.eval()
    try:
        if not is_zero3(engine):  # every rank holds the whole student already
            yield module, None
        elif mode == "gather":
            with whole_student(engine):
                yield module, None
        else:
            yield module, groups.dp_group
    finally:
        module.train(was_training)


def partitioned_parameters(params) -> list:
    """The ZeRO-3 parameters a `GatheredParameters` context needs: all but the persistent ones that
    are whole on this rank already (a persistent parameter is fetched at its first forward, so
    before the first step it may still be partitioned)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if hasattr(p, "ds_id")
            and not (getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE)]


@contextlib.contextmanager
def whole_student(engine):
    """The ZeRO-3 student gathered whole, its ZeRO-3 hooks off. DeepSpeed's own
    `unwrap_model_for_generation` leaves the top module's start-of-forward hook on; until ZeRO has
    traced a full step that hook checks the module order across ranks (a collective), which ranks
    decoding different numbers of steps would deadlock on. So it comes off too, and goes back first,
    in its original order.

    Only the partitioned parameters are gathered: leaving a `GatheredParameters` context partitions
    every parameter it holds, persistent ones included (DeepSpeed 0.19), and a persistent parameter
    is not whole again until the step's end, so each rollout made the following forward and backward
    fetch every small parameter one all-gather at a time."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    module = offload.module
    partitioned = partitioned_parameters(module.parameters())
    with deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
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


def sample_responses(
    model, prompts: list[list[int]], keys: list[int], settings: RolloutSettings, step: int, lockstep_group=None,
    routing=None,
) -> list[list[int]]:
    """One sampled response per prompt (ending with EOS unless cut at max_new_tokens). Every rank of
    `lockstep_group` calls this, with or without prompts of its own."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts or [[settings.eos_token_id]], settings.pad_token_id)
    keys_B = torch.tensor(keys or [-1], dtype=torch.long, device=device)
    new_BN = decode_ids(
        model, ids.to(device), mask.to(device), max_new_tokens=settings.max_new_tokens, sampling=settings.sampling,
        seed=settings.seed, step=step, keys_B=keys_B, eos_token_id=settings.eos_token_id,
        pad_token_id=settings.pad_token_id, vocab_limit=settings.vocab_limit, lockstep_group=lockstep_group,
        routing=routing,
    )
    return [cut_at_eos(row, settings.eos_token_id, keep_eos=True) for row in new_BN.tolist()][: len(prompts)]


def student_rollout(engine, prompts, keys, settings: RolloutSettings, step: int, groups: ParallelGroups):
    """Responses of the student in `engine` (every rank calls this, once per micro-batch)."""
    with generation_model(engine, settings.mode, groups) as (model, lockstep):
        return sample_responses(model, prompts, keys, settings, step, lockstep)
