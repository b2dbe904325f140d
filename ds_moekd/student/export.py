"""Write the trained student as a Hugging Face checkpoint (atomically)."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch.distributed as dist

from ds_moekd.atomic import replace_dir
from ds_moekd.dist import ParallelGroups


def export_hf(engine, tokenizer, out_dir: Path, groups: ParallelGroups, generation_config=None) -> None:
    """Gather the ZeRO-3 partitions and save a loadable HF model dir on rank 0 (all ranks call)."""
    model = engine.module
    params = list(model.parameters())
    # GatheredParameters is collective: every rank enters; rank 0 copies the full tensors out.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
        state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if groups.rank == 0 else None
    if groups.rank == 0:
        model.config.use_cache = True
        with replace_dir(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            if generation_config is not None:
                generation_config.save_pretrained(tmp)
    if dist.is_initialized():
        dist.barrier()
