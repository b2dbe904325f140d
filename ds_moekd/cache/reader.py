"""Training from a teacher cache: the teacher's targets of a micro-batch, read instead of computed
(docs/teacher-cache.md). No teacher is loaded; the loss scores the cached top-k distributions
(kernels' SparseTeacher: forward KL over the k cached tokens and the rest as one outcome)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ds_moekd.cache.manifest import check_run, read_manifest
from ds_moekd.cache.shards import ShardReader, verified_shards
from ds_moekd.data.batching import Batch, TokenizedDataset
from ds_moekd.kernels import SparseTeacher
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.run.errors import ConfigError
from ds_moekd.runtime.telemetry import log

if TYPE_CHECKING:
    from ds_moekd.config import RunConfig


class TeacherCache:
    """The cached targets of routing `kd.targets` for the run's training set."""

    def __init__(self, folder: Path, reader: ShardReader, routing: str, packs: list[list[int]] | None):
        self.folder, self.reader, self.routing, self.packs = folder, reader, routing, packs

    @classmethod
    def open(cls, cfg: RunConfig, tokenizer, dataset: TokenizedDataset, packs: list[list[int]] | None) -> TeacherCache:
        """Check the cache against the run (manifest, then every shard's checksum) and open it."""
        folder = resolve_path(cfg.teacher.cache)
        manifest = read_manifest(folder)
        check_run(folder, manifest, cfg, tokenizer, dataset)
        count = manifest["shards"]["count"]
        good, problems = verified_shards(folder, count)
        if problems:
            raise ConfigError(f"config field teacher.cache={str(folder)!r} is incomplete or damaged ({len(good)} of "
                              f"{count} shards verified): " + "; ".join(problems[:3]) +
                              "; run `ds-moekd teacher-cache` again to finish or repair it")
        log.info("teacher cache %s: %s targets, top-%d, %d shards verified", folder, cfg.kd.targets,
                 manifest["targets"]["top_k"], count)
        return cls(folder, ShardReader(folder, count, manifest["shards"]["examples_per_shard"]), cfg.kd.targets, packs)

    def examples_of(self, batch: Batch) -> list[int]:
        """The training examples of the batch's rows, in the order of their response rows."""
        rows = batch.example_ids.tolist()
        return [e for r in rows for e in self.packs[r]] if self.packs is not None else rows

    def scores(self, batch: Batch, draws: int) -> SparseTeacher:
        """The first `draws` cached draws at the batch's response positions, `[draws, N, k]`."""
        examples = self.examples_of(batch)
        targets = torch.cat([self.reader.rows(e, "targets") for e in examples])
        if not torch.equal(targets.long(), batch.targets[batch.loss_mask.bool()].cpu()):
            raise RuntimeError(f"teacher cache {self.folder}: the cached response tokens of examples "
                               f"{examples[:4]}... differ from the batch's; the cache is not this run's")
        read = {name: torch.cat([self.reader.rows(e, f"{self.routing}.{name}", draws) for e in examples])
                for name in ("logprobs", "ids", "tail")}
        device = batch.input_ids.device
        return SparseTeacher(read["logprobs"].transpose(0, 1).float().to(device),
                             read["ids"].transpose(0, 1).long().to(device),
                             read["tail"].transpose(0, 1).float().to(device))
