"""`ds-moekd teacher-cache`: run the expert-parallel teacher over the training split once and keep,
per response token, its top-k log-probabilities, their token ids and the probability left over,
for each routing asked (docs/teacher-cache.md). Under any launcher, at any world size:

    ds-moekd teacher-cache --config RUN.yaml --out CACHE [--routing native,ka] [--top-k 64]
    deepspeed --num_gpus 8 --module ds_moekd.cache.build --config RUN.yaml --out CACHE

The shards (cache/shards.py) are dealt round-robin to the ranks; every rank runs the teacher's
forward in lockstep (its expert exchanges are collective), with a one-row stand-in once its own
shards are done. A killed build resumes: shards whose checksums verify are kept, the rest rebuilt.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer

from ds_moekd import kernels
from ds_moekd.cache.manifest import MANIFEST, build_manifest, first_difference, read_manifest, write_manifest
from ds_moekd.cache.shards import SHARDS, discard, verified_shards, write_shard
from ds_moekd.config import KD_TARGETS, RunConfig, check_paths_exist, load_config
from ds_moekd.data.batching import Batch, TokenizedDataset, collate
from ds_moekd.methods.kd import routing_of, targets_of
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.modelfiles.checks import check_model_files, check_teacher_vocabulary
from ds_moekd.modelfiles.locate import resolve_model
from ds_moekd.run.errors import ConfigError, run_command
from ds_moekd.runtime.device import rank_device, resolve_precision, teacher_dtype
from ds_moekd.runtime.dist import ParallelGroups, init_distributed, set_collective_timeout, shutdown
from ds_moekd.runtime.host import configure_process
from ds_moekd.runtime.telemetry import log, phase, setup_logging
from ds_moekd.teacher.calibration import CALIBRATION_BATCHES
from ds_moekd.train import load_teacher, place_teacher_experts, teacher_scores, training_examples

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOG_EVERY_S = 30.0
ROW_CHUNK = 256  # teacher logits are formed this many tokens at a time: a [chunk, V] fp32 slab


def top_k_targets(hidden, head_VH: torch.Tensor, k: int, temperature: float):
    """(log-probabilities `[N, M, k]`, token ids `[N, M, k]`, log tail mass `[N, M]`) of the teacher's
    softmax(logits / T) from its final hidden states (`[N, H]`, or `[M, N, H]` for M draws)."""
    draws = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    out = []
    for hidden_NH in draws:
        parts = []
        for start in range(0, hidden_NH.shape[0], ROW_CHUNK):
            log_p = torch.log_softmax((hidden_NH[start:start + ROW_CHUNK] @ head_VH.t()).float() / temperature, -1)
            logprobs, ids = log_p.topk(k, dim=-1)
            parts.append((logprobs, ids, log_p.scatter_(1, ids, float("-inf")).logsumexp(-1)))
        out.append([torch.cat(p) for p in zip(*parts, strict=True)])
    return tuple(torch.stack(t, dim=1) for t in zip(*out, strict=True))


def shard_range(shard: int, per_shard: int, examples: int) -> range:
    """The example ids of shard `shard` (cache/shards.py)."""
    return range(shard * per_shard, min((shard + 1) * per_shard, examples))


def shard_batches(dataset: TokenizedDataset, shards: list[int], per_shard: int, batch_size: int, pad: int):
    """(shard, example ids, batch) of the shards in turn, each shard's examples sorted by length so a
    batch pads little."""
    for shard in shards:
        yield from _one_shard(dataset, shard, per_shard, batch_size, pad)


def _one_shard(dataset: TokenizedDataset, shard: int, per_shard: int, batch_size: int, pad: int):
    ids = shard_range(shard, per_shard, len(dataset.examples))
    ordered = sorted(ids, key=lambda i: len(dataset.examples[i].prompt_ids) + len(dataset.examples[i].response_ids))
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        yield shard, chunk, collate([dataset.examples[i] for i in chunk], pad, example_ids=chunk)


class ShardWriter:
    """Collects one shard's examples, in any order, and writes them in example order."""

    def __init__(self, folder: Path, shard: int, examples: range, routings: list[str], dtype: torch.dtype):
        self.folder, self.shard, self.examples, self.routings, self.dtype = folder, shard, examples, routings, dtype
        self.rows: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, example: int, tensors: dict[str, torch.Tensor]) -> None:
        self.rows[example] = tensors

    @property
    def full(self) -> bool:
        return len(self.rows) == len(self.examples)

    def write(self) -> None:
        ordered = [self.rows[e] for e in self.examples]
        lengths = torch.tensor([0] + [len(r["targets"]) for r in ordered])
        tensors = {"offsets": lengths.cumsum(0), **{name: torch.cat([r[name] for r in ordered])
                                                    for name in ordered[0]}}
        for name in tensors:
            if name.endswith(".logprobs"):
                tensors[name] = tensors[name].to(self.dtype)
        write_shard(self.folder, self.shard, tensors, (self.examples.start, self.examples.stop))


def prepare_folder(folder: Path, manifest: dict, groups: ParallelGroups, overwrite: bool) -> list[int]:
    """Write or check the manifest; return the shards still to build (the same list on every rank)."""
    pending = None
    if groups.rank == 0:
        if (folder / MANIFEST).is_file():
            found = first_difference(read_manifest(folder, "--out"), manifest)
            if found and not overwrite:
                key, old, new = found
                raise ConfigError(f"--out {folder}: holds a cache built with other inputs ({key}: {old!r} there, "
                                  f"{new!r} now); choose another folder or pass --overwrite to replace it")
            if found:
                shutil.rmtree(folder)
        (folder / SHARDS).mkdir(parents=True, exist_ok=True)
        write_manifest(folder, manifest)
        count = manifest["shards"]["count"]
        good, _ = verified_shards(folder, count)
        pending = [i for i in range(count) if i not in good]
        for index in pending:
            discard(folder, index)
        if good:
            log.info("resuming %s: %d of %d shards verified and kept", folder, len(good), count)
    shared = [pending]
    if groups.world_group is not None:
        dist.broadcast_object_list(shared, src=0, group=groups.world_group)
    return shared[0]


def example_targets(teacher, batch: Batch, vocab: int, cfg: RunConfig, routings: list[str], top_k: int):
    """Per example of the batch: {targets, <routing>.logprobs, .ids, .tail} at its response rows."""
    per_example = {"targets": batch.targets[batch.loss_mask.bool()]}
    for name in routings:
        with torch.no_grad():
            hidden, head = teacher_scores(teacher, batch, vocab, True, targets_of(cfg, name))
            logprobs, ids, tail = top_k_targets(hidden, head, top_k, cfg.loss.temperature)
        per_example.update({f"{name}.logprobs": logprobs, f"{name}.ids": ids.int(), f"{name}.tail": tail})
    counts = batch.loss_mask.sum(1).long().tolist()
    split = {name: t.cpu().split(counts) for name, t in per_example.items()}
    return [{name: parts[i] for name, parts in split.items()} for i in range(len(counts))]


def build(cfg: RunConfig, out: Path, *, routings: list[str], top_k: int, dtype: str, shard_examples: int,
          batch_size: int, overwrite: bool = False) -> dict | None:
    """Build (or finish) the cache at `out`; rank 0 returns its build numbers."""
    if not cfg.teacher.path:
        raise ConfigError("config field teacher.path is required: the cache is made by running the teacher")
    check_paths_exist(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=None)))  # the output
    set_collective_timeout(cfg.train.collective_timeout_s)
    configure_process()
    with phase("distributed start"):
        info = init_distributed(cfg.train.dist_backend)
        setup_logging(info.rank)
        groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size)
    device = rank_device(info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    kernels.configure(expert_backend=cfg.teacher.expert_backend, loss_backend=cfg.loss.backend)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.student.path))
    vocab = len(tokenizer)
    top_k = top_k or vocab
    if top_k > vocab:
        raise ConfigError(f"--top-k {top_k} exceeds the tokenizer's {vocab} tokens (0 keeps them all)")
    check_model_files(resolve_model(cfg.teacher.path), "teacher.path")
    check_teacher_vocabulary(resolve_model(cfg.teacher.path), tokenizer)
    dataset = training_examples(cfg, tokenizer)
    t_dtype = teacher_dtype(cfg.teacher.dtype, precision)
    manifest = build_manifest(cfg, tokenizer, dataset, routings=routings, top_k=top_k, dtype=dtype,
                              shard_examples=shard_examples, teacher_dtype=str(t_dtype).removeprefix("torch."))
    pending = prepare_folder(out, manifest, groups, overwrite)
    if not pending:
        log.info("teacher cache %s is complete already: every shard verified", out)
        return json.loads((out / "build.json").read_text()) if groups.rank == 0 else None
    with phase("teacher load"):
        teacher = load_teacher(cfg, groups, device, precision)
    mine = pending[groups.rank::groups.world_size]
    total = sum(len(dataset.examples[i].response_ids) for s in pending
                for i in shard_range(s, shard_examples, len(dataset.examples)))
    log.info("teacher cache %s: %d of %d shards to build (%d response tokens), routings %s, top-%d, this rank %s",
             out, len(pending), manifest["shards"]["count"], total, routings, top_k, mine)
    start = logged = time.perf_counter()
    done = 0  # tokens of every rank
    work = shard_batches(dataset, mine, shard_examples, batch_size, tokenizer.pad_token_id)
    stand_in = collate([dataset.examples[0]], tokenizer.pad_token_id, example_ids=[0]).to(device)
    first = list(itertools.islice(work, CALIBRATION_BATCHES))  # calibrate on them, then build them
    calibration = [batch.to(device) for _, _, batch in first]
    work = itertools.chain(first, work)
    # the placement serves the sparse routing, if any is asked (ds_moekd/train.py)
    place_teacher_experts(cfg, teacher, routing_of(cfg, "native" if "native" in routings else routings[0]),
                          calibration + [stand_in] * (CALIBRATION_BATCHES - len(calibration)))
    writers: dict[int, ShardWriter] = {}
    with tqdm(total=total, unit="tok", disable=groups.rank != 0, desc="teacher cache", dynamic_ncols=True) as bar:
        while True:
            item = next(work, None)
            tokens = 0 if item is None else int(item[2].loss_mask.sum())
            round_ = torch.tensor([float(item is not None), float(tokens)], device=device)
            if groups.world_group is not None:  # every rank forwards while any has work (collective experts)
                dist.all_reduce(round_, group=groups.world_group)
            if round_[0] == 0:
                break
            batch = stand_in if item is None else item[2].to(device)
            rows = example_targets(teacher, batch, vocab, cfg, routings, top_k)
            done += int(round_[1])
            bar.update(int(round_[1]))
            if item is None:
                continue
            shard, ids, _ = item
            writer = writers.setdefault(shard, ShardWriter(
                out, shard, shard_range(shard, shard_examples, len(dataset.examples)), routings, DTYPES[dtype]))
            for example, tensors in zip(ids, rows, strict=True):
                writer.add(example, tensors)
            if writer.full:
                writer.write()
                del writers[shard]
                if time.perf_counter() - logged > LOG_EVERY_S:  # the bar is rank 0's; a log line every rank's
                    logged = time.perf_counter()
                    log.info("shard %d written; %d of %d tokens on all ranks, %.0f tokens/s", shard, done, total,
                             done / max(1e-9, logged - start))
    elapsed = time.perf_counter() - start
    if groups.world_group is not None:
        dist.barrier(group=groups.world_group)
    if groups.rank != 0:
        return None
    good, problems = verified_shards(out, manifest["shards"]["count"])
    if problems:
        raise RuntimeError(f"teacher cache {out}: {len(problems)} shards failed verification: {problems[:3]}")
    size = sum(p.stat().st_size for p in (out / SHARDS).glob("*.safetensors"))
    numbers = {"tokens_built": total, "seconds": elapsed, "tokens_per_s": total / elapsed if elapsed else None,
               "bytes": size, "bytes_per_token": size / manifest["data"]["response_tokens"],
               "world_size": groups.world_size, "routings": routings, "top_k": top_k, "dtype": dtype}
    (out / "build.json").write_text(json.dumps(numbers, indent=1) + "\n")
    log.info("teacher cache %s complete: %d shards, %.1f MB, %.0f bytes per token", out, len(good), size / 1e6,
             numbers["bytes_per_token"])
    return numbers


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds-moekd teacher-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run config whose teacher, data and tokenizer to use")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.ep_size=2")
    parser.add_argument("--out", help="cache folder (default: the config's teacher.cache)")
    parser.add_argument("--routing", default=None,
                        help=f"comma-separated routings to keep, of {KD_TARGETS} (default: the config's kd.targets)")
    parser.add_argument("--top-k", type=int, default=64, help="tokens kept per position (0: the whole vocabulary)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="of the kept log-probabilities")
    parser.add_argument("--shard-examples", type=int, default=256, help="examples per shard file")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per forward (default data.micro_batch_size)")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache built from other inputs")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_args(argv)


def main(argv=None) -> None:
    run_command(_main, sys.argv[1:] if argv is None else list(argv), "ds-moekd teacher-cache")


def _main(argv) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.teacher.cache
    if not out:
        raise ConfigError("give --out or set teacher.cache in the config: where to write the cache")
    routings = (args.routing or cfg.kd.targets).split(",")
    unknown = [r for r in routings if r not in KD_TARGETS]
    if unknown or args.top_k < 0 or args.shard_examples < 1:
        raise ConfigError(f"--routing takes {KD_TARGETS} (got {unknown}), --top-k 0 or more, --shard-examples 1 or more")
    try:
        build(cfg, resolve_path(out), routings=routings, top_k=args.top_k, dtype=args.dtype,
              shard_examples=args.shard_examples, batch_size=args.batch_size or cfg.data.micro_batch_size,
              overwrite=args.overwrite)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
