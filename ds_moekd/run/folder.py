"""Never silently overwrite a run (docs/reliability.md, "Run folders").

An output folder that already holds a run (its metrics, checkpoints or run.json) is used only
when the user says how: `train.resume=true` continues it (the checkpoint's settings are checked
in ds_moekd.run.checkpoints), `train.overwrite=true` starts again, removing the old run's metrics and
checkpoints. Its exports stay until the new run replaces them atomically with finite weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ds_moekd.config import RunConfig
from ds_moekd.run.errors import UserError
from ds_moekd.runtime.telemetry import log

# What a run leaves once it has trained (a config.yaml alone, from a run that failed at start-up,
# holds nothing to lose and is simply replaced).
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "run.json")
# What belongs to one training run and is removed on overwrite (exports are replaced later).
RUN_STATE = ("checkpoints", "metrics.jsonl", "validation.jsonl", "run.json", "report.md", "loss.png")


def existing_run(run_dir: Path) -> str | None:
    """'finished', 'unfinished' or None (no run there)."""
    if (run_dir / "run.json").is_file():
        return "finished"
    if any((run_dir / name).exists() for name in RUN_MARKERS):
        return "unfinished"
    return None


def check_run_folder(cfg: RunConfig) -> None:
    """Raise unless this run may use its folder (every rank calls it before anything is written)."""
    if cfg.train.resume and cfg.train.overwrite:
        raise UserError("train.resume and train.overwrite are both set: choose one")
    state = existing_run(cfg.run_dir)
    if state is None or cfg.train.overwrite or cfg.train.resume:
        return
    raise UserError(f"{cfg.run_dir} already holds a{' finished' if state == 'finished' else 'n unfinished'} run; "
                    "continue it with train.resume=true, start again with train.overwrite=true, or choose "
                    "another name/output_dir")


def clear_previous_run(cfg: RunConfig) -> None:
    """On overwrite, remove the old run's state (rank 0, after every rank has checked the folder)."""
    if not cfg.train.overwrite or existing_run(cfg.run_dir) is None:
        return
    log.warning("train.overwrite: removing the previous run's checkpoints and metrics in %s", cfg.run_dir)
    for name in RUN_STATE:
        path = cfg.run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
