"""Write the trained student as a Hugging Face checkpoint (atomically)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ds_moekd.run.atomic import replace_dir
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.student.lora import is_lora, save_lora_student
from ds_moekd.student.zero3 import gathered_parameters


def export_hf(engine, tokenizer, out_dir: Path, groups: ParallelGroups, generation_config=None,
              merge_lora: bool = False) -> None:
    """Gather the ZeRO-3 partitions and save a loadable HF model dir on rank 0 (all ranks call); a LoRA
    student writes its adapters, or with `merge_lora` the merged model (student/lora.py)."""
    model = engine.module
    with gathered_parameters(model):  # collective: every rank enters; rank 0 copies the full tensors out
        state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if groups.rank == 0 else None
    if groups.rank == 0:
        model.config.use_cache = True
        with replace_dir(out_dir) as tmp:
            if is_lora(model):
                save_lora_student(model, state, tmp, merge_lora)
            else:
                model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            if generation_config is not None:
                generation_config.save_pretrained(tmp)
    if dist.is_initialized():
        dist.barrier()
