"""`ds-moekd plan` against measured peak memory: short training runs on CPU processes, each
rank's peak resident set (metrics.jsonl's peak_memory_mb, rank 0) next to the plan's peak for
the same run config (benchmarks/plan_vs_measured.py, tests/planning/test_plan.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ds_moekd.config import load_config
from ds_moekd.modelfiles.assets import DS_CONFIGS
from ds_moekd.planning.plan import MIB, plan
from ds_moekd.runtime.dist import free_loopback_port


def run_overrides(name: str, out: Path, demo: Path, teacher: Path, world: int, micro_batch: int) -> list[str]:
    return [
        f"name={name}", f"output_dir={out}", "train.steps=2", f"data.micro_batch_size={micro_batch}",
        f"data.train_file={demo}/data/train.jsonl", f"data.valid_file={demo}/data/valid.jsonl",
        f"teacher.path={teacher}", f"student.path={demo}/student", "report.eval_examples=0", "validation.every=0",
        f"student.deepspeed_config={DS_CONFIGS}/zero3_cpu.json", f"teacher.ep_size={world}",
    ]


def measure(name: str, out: Path, demo: Path, teacher: Path, world: int = 1, micro_batch: int = 4) -> dict:
    """Train 2 KD steps on `world` CPU ranks (EP = world); return the plan's and the measured peak (MiB)."""
    overrides = run_overrides(name, out, demo, teacher, world, micro_batch)
    config = str(DS_CONFIGS / "methods" / "kd.yaml")
    port = str(free_loopback_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, "-m", "ds_moekd.train", "--config", config, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", port, "-m", "ds_moekd.train", "--config", config, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"plan check run {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    measured = max(json.loads(line)["peak_memory_mb"] for line in lines)
    planned = plan(load_config(config, overrides), world, "cpu")["device_total_bytes"] / MIB
    return {"name": name, "world_size": world, "teacher_mb": _folder_mb(teacher), "measured_peak_mib": measured,
            "plan_peak_mib": planned, "error": planned / measured - 1}


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6
