"""Resume at another world size (docs/scale-out.md).

A ZeRO-3 checkpoint holds one optimizer/parameter partition per rank, so DeepSpeed refuses to load
it at another world size (ZeRORuntimeException). DeepSpeed's universal checkpoint stores every
parameter and its optimizer states whole, one file each: `ds_to_universal` converts a tag folder,
and an engine built with `checkpoint.load_universal` re-partitions it for its own world size. This
module notices the mismatch before the engine is built, converts once (rank 0, into
`<tag>_universal` beside the original, pointed to by `latest_universal`) and says which DeepSpeed
JSON keys the engine then needs.
"""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import torch.distributed as dist

from ds_moekd.runtime.telemetry import log

_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel ranks that wrote a ZeRO checkpoint: one optimizer partition file each."""
    ranks = {int(m.group(1)) for f in tag_dir.iterdir() if (m := _OPTIM_FILE.search(f.name))}
    if not ranks:
        raise FileNotFoundError(f"train.resume: {tag_dir} holds no ZeRO optimizer partitions "
                                "(zero_pp_rank_*_optim_states.pt); is it a DeepSpeed checkpoint?")
    return len(ranks)


def universal_resume_config(ckpt_dir: Path, world_size: int, tag: str | None = None) -> dict:
    """DeepSpeed JSON keys for resuming from checkpoint `tag` (default: `latest`) of `ckpt_dir` at
    `world_size`: {} when it was written by as many ranks; else it is converted to a universal one
    (once, by rank 0; every rank must call this) and {"checkpoint": {"load_universal": True}}."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return {}
    saved = saved_world_size(ckpt_dir / tag)
    if saved == world_size:
        return {}
    universal = f"{tag}_universal"
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not (ckpt_dir / universal / "zero").is_dir():
            log.info("train.resume: %s was written by %d ranks, this run has %d: converting it to a universal "
                     "checkpoint in %s", ckpt_dir / tag, saved, world_size, ckpt_dir / universal)
            convert_to_universal(ckpt_dir / tag, ckpt_dir / universal)
        (ckpt_dir / "latest_universal").write_text(universal)
    if dist.is_initialized():
        dist.barrier()
    return {"checkpoint": {"load_universal": True}}


def convert_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal on one tag folder (single worker: it runs inside a training rank)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = out_dir.with_name(out_dir.name + ".partial")
    ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    partial.rename(out_dir)
