"""Keep the global batch when a run resumes at another world size (docs/reliability.md, "Elastic
resume").

The global batch (micro-batch × ranks × gradient accumulation) is frozen in every checkpoint
(ds_moekd/run/checkpoints.py). Resuming on fewer or more ranks, after losing a node or with a new
allocation, keeps it the way DeepSpeed's `elasticity` section does: the train batch is fixed, the
micro-batch is the largest candidate that fits, and gradient accumulation makes up the rest. Here
the candidates are the configured micro-batch and every smaller one (it bounds memory): the
configured one is kept whenever it divides the per-rank share. A world size that does not divide
the global batch cannot keep it (DeepSpeed's ElasticityIncompatibleWorldSize); the refusal names
the world sizes that can, and the overrides that come closest on this one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ds_moekd.config import RunConfig
from ds_moekd.run.checkpoints import MANIFEST, verified
from ds_moekd.run.errors import UserError
from ds_moekd.run.reshard import saved_world_size
from ds_moekd.runtime.telemetry import log


def batch_layout(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation steps) with micro-batch × world_size × steps == global_batch and the
    largest micro-batch <= max_micro_batch; None when world_size does not divide global_batch."""
    if global_batch % world_size:
        return None
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(max_micro_batch, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def _overrides(micro: int, steps: int) -> str:
    return f"data.micro_batch_size={micro} train.gradient_accumulation_steps={steps}"


def _refusal(tag_dir: Path, global_batch: int, world_size: int, max_micro_batch: int) -> UserError:
    fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
    closest = [g for g in (global_batch // world_size * world_size, (global_batch // world_size + 1) * world_size) if g]
    options = " or ".join(f"`{_overrides(*batch_layout(g, world_size, max_micro_batch))}` (global batch {g})"
                          for g in closest)
    return UserError(f"resume from {tag_dir}: its global batch of {global_batch} cannot be kept on {world_size} ranks "
                     f"({world_size} does not divide it). Launch on a number of ranks that does ({fits}), or change "
                     f"the global batch with train.allow_config_change=true and {options}")


def keep_global_batch(cfg: RunConfig, ckpt_dir: Path, world_size: int) -> RunConfig:
    """`cfg` with micro-batch and accumulation chosen so that this world size keeps the newest
    committed checkpoint's global batch; `cfg` itself when it already does, when there is no
    checkpoint, when the checkpoint has this world size (a changed batch is then the user's choice,
    checked by checkpoints.check_settings) or with train.allow_config_change."""
    committed = verified(ckpt_dir) if ckpt_dir.is_dir() else []
    if not committed or cfg.train.allow_config_change:
        return cfg
    tag_dir = committed[0][1]
    saved = json.loads((tag_dir / MANIFEST).read_text()).get("settings", {}).get("global_batch")
    micro, steps = cfg.data.micro_batch_size, cfg.train.gradient_accumulation_steps
    if saved is None or saved == micro * world_size * steps or saved_world_size(tag_dir) == world_size:
        return cfg
    layout = batch_layout(saved, world_size, micro)
    if layout is None:
        raise _refusal(tag_dir, saved, world_size, micro)
    log.info("resume: %s was written by %d ranks; keeping its global batch of %d on %d: %s (this config has %s)",
             tag_dir, saved_world_size(tag_dir), saved, world_size, _overrides(*layout), _overrides(micro, steps))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=layout[0]),
                               train=dataclasses.replace(cfg.train, gradient_accumulation_steps=layout[1]))
