"""A teacher cache's shards: one safetensors file of consecutive examples each, with a sidecar
naming its checksum (docs/teacher-cache.md).

Shard i holds examples [i·S, (i+1)·S) of the tokenised training set. Its tensors:
  offsets             [E + 1] int64    example j's response tokens are rows offsets[j]:offsets[j+1]
  targets             [T] int32        the response token ids (a check that the run tokenised alike)
  <routing>.logprobs  [T, D, k]        top-k log-probabilities of each of D draws, at the temperature
  <routing>.ids       [T, D, k] int32  their token ids
  <routing>.tail      [T, D] fp32      log of the probability outside the top k (−inf: none left)
A shard is written to a temporary name and renamed, then its sidecar (checksum, example range) is
written the same way: a shard counts as done only once its sidecar exists and its bytes match it,
so a killed build leaves nothing that a resumed one would trust by mistake.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ds_moekd.run.atomic import file_sha256, write_text
from ds_moekd.runtime.telemetry import log

SHARDS = "shards"


def shard_path(folder: Path, index: int, suffix: str) -> Path:
    return folder / SHARDS / f"shard-{index:05d}{suffix}"


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], examples: tuple[int, int]) -> None:
    path = shard_path(folder, index, ".safetensors")
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    sidecar = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path),
               "examples": list(examples), "response_tokens": int(tensors["targets"].numel())}
    write_text(shard_path(folder, index, ".json"), json.dumps(sidecar) + "\n")


def verified_shards(folder: Path, count: int) -> tuple[list[int], list[str]]:
    """(indices of the shards whose bytes match their sidecar, a line per shard that is missing or bad)."""
    good, problems = [], []
    for index in range(count):
        sidecar, path = shard_path(folder, index, ".json"), shard_path(folder, index, ".safetensors")
        if not sidecar.is_file():
            problems.append(f"{path.name}: not written")
            continue
        want = json.loads(sidecar.read_text())
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            problems.append(f"{path.name}: missing or {path.stat().st_size if path.is_file() else 0} bytes, "
                            f"not {want['bytes']}")
        elif file_sha256(path) != want["sha256"]:
            problems.append(f"{path.name}: checksum differs from {sidecar.name}")
        else:
            good.append(index)
    return good, problems


def discard(folder: Path, index: int) -> None:
    """Remove a shard that is not verified (a killed write, a corrupted file) before it is rebuilt."""
    for suffix in (".json", ".safetensors", ".safetensors.tmp"):
        shard_path(folder, index, suffix).unlink(missing_ok=True)


class ShardReader:
    """Row slices of one example's targets, read from the memory-mapped shards on demand."""

    def __init__(self, folder: Path, count: int, examples_per_shard: int):
        self.examples_per_shard = examples_per_shard
        self.files = [safe_open(str(shard_path(folder, i, ".safetensors")), framework="pt") for i in range(count)]
        self.offsets = [f.get_tensor("offsets").tolist() for f in self.files]
        log.info("teacher cache: %d shards opened from %s", count, folder)

    def rows(self, example: int, name: str, draws: int | None = None) -> torch.Tensor:
        """Tensor `name` at example `example`'s response rows (the first `draws` draws, if given)."""
        shard, j = divmod(example, self.examples_per_shard)
        start, end = self.offsets[shard][j], self.offsets[shard][j + 1]
        rows = self.files[shard].get_slice(name)[start:end]
        return rows if draws is None else rows[:, :draws]
