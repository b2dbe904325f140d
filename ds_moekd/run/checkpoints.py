"""Checkpoints that commit safely and resume from the newest verified one (docs/reliability.md).

A checkpoint `checkpoints/stepN/` counts only once its `manifest.json` exists. Every rank writes
its DeepSpeed shards; then all ranks agree that every rank succeeded (one all-reduce), hash a
share of the files each (sizes and SHA-256), and rank 0 writes the manifest last, then `latest`.
A crash, a full disk or a failed rank anywhere before that leaves no manifest, so the folder is
ignored on resume. Resume verifies candidates newest first, says which it skipped and why, and
refuses a checkpoint whose run settings (`FROZEN_FIELDS`) differ from the config unless
`train.allow_config_change` is set. Only the newest `train.keep_checkpoints` verified ones stay.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from ds_moekd.config import RunConfig
from ds_moekd.run.atomic import file_sha256, write_text
from ds_moekd.run.errors import EnvironmentProblem, UserError
from ds_moekd.runtime.dist import ParallelGroups, any_rank
from ds_moekd.runtime.telemetry import log

MANIFEST = "manifest.json"
TAG = re.compile(r"^step(\d+)$")
# What a resumed run must share with the checkpoint: together they fix the data order, the
# global batch, the optimisation and the models (changing them silently gives a different run).
# The global batch (micro-batch × ranks × accumulation) is frozen, not its factors: a checkpoint
# resumes at another world size with the same global batch (ds_moekd/run/reshard.py, docs/scale-out.md).
FROZEN_FIELDS = ("method", "data.train_file", "train.seed", "optim.lr", "teacher.path", "student.path")


def frozen_settings(cfg: RunConfig, world_size: int) -> dict:
    settings = {}
    for path in FROZEN_FIELDS:
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        settings[path] = value
    settings["global_batch"] = cfg.data.micro_batch_size * world_size * cfg.train.gradient_accumulation_steps
    return settings


def _files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _gather(obj, groups: ParallelGroups) -> list:
    if groups.world_group is None:
        return [obj]
    out = [None] * groups.world_size
    dist.all_gather_object(out, obj, group=groups.world_group)
    return out


def _my_share(names: list[str], groups: ParallelGroups) -> list[str]:
    return names[groups.rank :: groups.world_size]  # every rank hashes a share, in parallel


def save(engine, ckpt_dir: Path, step: int, client_state: dict, groups: ParallelGroups, cfg: RunConfig) -> None:
    """Write and commit `ckpt_dir/step{step}` (all ranks call)."""
    tag = f"step{step}"
    tag_dir = ckpt_dir / tag
    failure = None
    try:
        if groups.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover uncommitted attempt at this step
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        failure = exc
        if dist.is_initialized():
            dist.barrier()  # the one DeepSpeed's save ends with, which the other ranks are waiting in
    if any_rank(failure is not None, groups.world_group):
        raise _save_failed(tag_dir, failure) from failure
    entries = {name: {"bytes": (tag_dir / name).stat().st_size, "sha256": file_sha256(tag_dir / name)}
               for name in _my_share(_files(tag_dir), groups)}
    shares = _gather(entries, groups)
    if groups.rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        manifest = {"step": step, "files": files, "settings": frozen_settings(cfg, groups.world_size)}
        try:
            write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            write_text(ckpt_dir / "latest", tag)  # DeepSpeed's own pointer, for its tools
        except OSError as exc:
            failure = exc
    if any_rank(failure is not None, groups.world_group):
        raise _save_failed(tag_dir, failure)
    if groups.rank == 0:
        prune(ckpt_dir, cfg.train.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()
    log.info("checkpoint %s committed (%d files)", tag_dir, len(_files(tag_dir)))


def _save_failed(tag_dir: Path, exc: BaseException | None) -> UserError:
    free = shutil.disk_usage(tag_dir.parent if tag_dir.parent.exists() else ".").free
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "another rank failed to write its part"
    if free < 16 * 2**20 or "No space left" in reason:
        return EnvironmentProblem(f"disk full while writing checkpoint {tag_dir} ({free} bytes free; {reason}); "
                                  "it was not committed and older checkpoints are kept. Free space and resume "
                                  "with train.resume=true")
    return UserError(f"writing checkpoint {tag_dir} failed ({reason}); it was not committed and older "
                     "checkpoints are kept")


def verified(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints (a manifest exists), newest first; contents are not checked here."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step*") if (m := TAG.match(p.name)) and p.is_dir()]
    return sorted(((s, p) for s, p in found if (p / MANIFEST).is_file()), reverse=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` committed checkpoints, and uncommitted ones older than them."""
    if keep <= 0:
        return
    kept = verified(ckpt_dir)[:keep]
    oldest_kept = kept[-1][0] if kept else 0
    for path in ckpt_dir.glob("step*"):
        m = TAG.match(path.name)
        if m and path.is_dir() and path not in [p for _, p in kept] and int(m.group(1)) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def _problems(tag_dir: Path, groups: ParallelGroups) -> list[str]:
    """What is wrong with a checkpoint: missing manifest or files, wrong sizes or checksums."""
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"unreadable manifest ({exc})"]
    found = []
    for name in _my_share(sorted(files), groups):
        path, want = tag_dir / name, files[name]
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            found.append(f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}")
        elif file_sha256(path) != want["sha256"]:
            found.append(f"{name} does not match its checksum")
    return found


def choose(ckpt_dir: Path, groups: ParallelGroups) -> Path | None:
    """The newest checkpoint whose files all match its manifest (all ranks call; same answer on all)."""
    for step_dir in sorted((p for p in ckpt_dir.glob("step*") if TAG.match(p.name) and p.is_dir()),
                           key=lambda p: -int(TAG.match(p.name).group(1))):
        if not (step_dir / MANIFEST).is_file():
            log.warning("resume: skipping %s: not committed (no %s; the save was interrupted)", step_dir, MANIFEST)
            continue
        problems = [p for share in _gather(_problems(step_dir, groups), groups) for p in share]
        if not problems:
            return step_dir
        log.warning("resume: skipping %s: %s", step_dir, "; ".join(sorted(problems)))
    return None


def check_settings(tag_dir: Path, cfg: RunConfig, world_size: int) -> None:
    """Refuse to resume with run settings that differ from the checkpoint's (unless allowed)."""
    saved = json.loads((tag_dir / MANIFEST).read_text()).get("settings", {})
    now = frozen_settings(cfg, world_size)
    changed = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]]
    if not changed:
        return
    if cfg.train.allow_config_change:
        log.warning("resume: settings changed (allowed by train.allow_config_change): %s", "; ".join(changed))
        return
    raise UserError(f"resume from {tag_dir} refused: {'; '.join(changed)}. Restore these settings, start a new run "
                    "(another name), or set train.allow_config_change=true to resume anyway")


def resume_point(ckpt_dir: Path, groups: ParallelGroups, cfg: RunConfig) -> Path | None:
    """The checkpoint a resume continues from: the newest verified one, its frozen settings checked
    against the run's (all ranks call); None to start fresh."""
    tag_dir = choose(ckpt_dir, groups) if ckpt_dir.is_dir() else None
    if tag_dir is None and ckpt_dir.is_dir() and any(TAG.match(p.name) for p in ckpt_dir.iterdir()):
        raise UserError(f"train.resume: no checkpoint in {ckpt_dir} is complete (see the reasons above); move the "
                        "folder aside to start again, or set train.overwrite=true instead of train.resume")
    if tag_dir is None:
        log.info("train.resume: no checkpoint in %s yet, starting at step 0", ckpt_dir)
        return None
    check_settings(tag_dir, cfg, groups.world_size)
    return tag_dir


def load(engine, tag_dir: Path, universal: bool = False) -> dict:
    """Load `tag_dir` (its universal conversion when `universal`) into the engine; its client state."""
    tag = f"{tag_dir.name}_universal" if universal else tag_dir.name
    try:
        path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag)
    except Exception as exc:  # noqa: BLE001 - name the checkpoint
        raise UserError(f"loading checkpoint {tag_dir} failed ({type(exc).__name__}: {exc}); move it aside "
                        "to resume from an older one") from exc
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {tag_dir}; move it aside to resume from an older one")
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state
