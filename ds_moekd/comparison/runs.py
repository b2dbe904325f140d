"""The training runs of a method comparison: one `deepspeed` launch per (config, seed), each from a
shipped config (docs/comparison.md): per seed, the student's SFT init first, then every method from
it. Finished runs (a `run.json`) are kept, so an interrupted comparison continues where it stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ds_moekd.runtime.dist import free_loopback_port


@dataclass(frozen=True)
class RunSpec:
    label: str  # the row it belongs to: a method config's name, or "init"
    config: Path
    seed: int

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def launch_command(spec: RunSpec, runs_dir: Path, world_size: int, overrides: list[str]) -> list[str]:
    """The `deepspeed` launch of one run: every rank on this machine, over loopback."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size),
        "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port()),
        "--module", "ds_moekd.train", "--config", str(spec.config),
        # train.resume: a run folder left by an interrupted comparison continues from its newest
        # verified checkpoint (a folder holding a run is refused otherwise, docs/reliability.md)
        f"name={spec.name}", f"output_dir={runs_dir}", f"train.seed={spec.seed}", "train.resume=true", *overrides,
    ]


def run_environment(world_size: int) -> dict[str, str]:
    """The ranks share this machine's cores: one rank's intra-op threads must not starve another's."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return env


def run_one(spec: RunSpec, runs_dir: Path, logs_dir: Path, world_size: int, overrides: list[str],
            log=print) -> float | None:
    """Train one run unless it finished earlier; returns its wall seconds (None: kept). A failed run
    stops the comparison, naming its log."""
    if (runs_dir / spec.name / "run.json").is_file():
        log(f"[compare] {spec.name}: finished earlier, kept")
        return None
    if not spec.config.is_file():
        raise FileNotFoundError(f"compare: no config for {spec.label!r} at {spec.config}")
    logs_dir.mkdir(parents=True, exist_ok=True)
    log(f"[compare] {spec.name}: training (log {logs_dir / spec.name}.log)")
    start = time.time()
    with open(logs_dir / f"{spec.name}.log", "w") as out:
        rc = subprocess.call(launch_command(spec, runs_dir, world_size, overrides), stdout=out,
                             stderr=subprocess.STDOUT, env=run_environment(world_size))
    if rc != 0:
        raise RuntimeError(f"compare: run {spec.name} failed (exit {rc}); see {logs_dir / spec.name}.log")
    return round(time.time() - start, 1)
