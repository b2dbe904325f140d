"""Export a teacher with some tensors replaced: the Student-Aware Router (SAR) tunes only the routers.

The output is the source Hugging Face checkpoint byte for byte except the safetensors shards that hold
a replaced tensor. Every other file is hard-linked (copied where links fail), so a large teacher costs
no extra disk; a rewritten shard keeps each tensor's dtype and the file's metadata. Written atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ds_moekd.run.atomic import replace_dir
from ds_moekd.teacher.loading import tensor_files

CONFIG_FILE = "config.json"


def export_with_replaced_tensors(
    source_dir: str | os.PathLike, out_dir: str | os.PathLike, replacements: dict[str, torch.Tensor]
) -> list[str]:
    """Write `source_dir` to `out_dir` with `replacements` (checkpoint tensor name -> new value) substituted.

    Values are cast to the dtype the tensor has in the checkpoint; shapes must match exactly. Everything is
    checked before anything is written, and an existing `out_dir` is replaced only on success. Returns the
    rewritten shard files (relative to the checkpoint folder), sorted.
    """
    source, out = Path(source_dir), Path(out_dir)
    _check_out_dir(source, out)
    new_by_shard = _plan(source, replacements)
    rewritten = sorted(new_by_shard)
    with replace_dir(out) as tmp:
        for dirpath, _, files in os.walk(source, followlinks=True):
            for file in files:
                src = Path(dirpath, file)
                rel = src.relative_to(source).as_posix()
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if rel in new_by_shard:
                    _rewrite_shard(src, dst, new_by_shard[rel])
                else:
                    _link_or_copy(src, dst)
    return rewritten


def _check_out_dir(source: Path, out: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"out_dir {out} must not be the source checkpoint {source} or inside it")


def _shard_of_tensors(source: Path) -> dict[str, str]:
    """Checkpoint tensor name -> shard file relative to `source` (the teacher loader's own mapping)."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such checkpoint folder")
    if not (source / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{source}: no {CONFIG_FILE}; not a Hugging Face checkpoint folder")
    return {name: Path(file).as_posix() for name, file in tensor_files(str(source)).items()}


def _plan(source: Path, replacements: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group the replacements by shard, after checking every name and shape against the shard headers."""
    shard_of = _shard_of_tensors(source)
    missing = sorted(name for name in replacements if name not in shard_of)
    if missing:
        suffix = ".".join(missing[0].split(".")[-2:])
        present = sorted(name for name in shard_of if name.endswith(suffix)) or sorted(shard_of)
        raise ValueError(
            f"{source}: {len(missing)} replaced tensor(s) not in the checkpoint: {missing[:5]}; "
            f"it holds e.g. {present[:5]} ({len(shard_of)} tensors)"
        )
    new_by_shard: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in replacements.items():
        new_by_shard.setdefault(shard_of[name], {})[name] = value
    for shard, new in new_by_shard.items():
        path = source / shard
        if not path.is_file():
            raise FileNotFoundError(f"{source}: shard {shard} (holding {sorted(new)[0]}) is missing")
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            for name, value in new.items():
                if name not in names:
                    raise ValueError(f"{path}: the index maps {name} to this shard, but it does not hold it")
                shape = list(f.get_slice(name).get_shape())
                if list(value.shape) != shape:
                    raise ValueError(f"{path}: {name} has shape {shape}, its replacement {list(value.shape)}")
    return new_by_shard


def _rewrite_shard(src: Path, dst: Path, new: dict[str, torch.Tensor]) -> None:
    # One shard in memory at a time; the copy keeps replacements that are views of one tensor from
    # sharing storage, which save_file refuses.
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for name, value in new.items():
        tensors[name] = value.detach().to(device="cpu", dtype=tensors[name].dtype, copy=True).contiguous()
    save_file(tensors, dst, metadata=metadata)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link shares the source's inode: whoever writes into the export in place writes into the source.
    # Resolve first: os.link on Linux links a symlink itself, and a hub cache snapshot's relative links
    # (../../blobs/...) would dangle in out_dir.
    target = src.resolve()
    try:
        os.link(target, dst)
    except OSError:
        shutil.copy2(target, dst)
