"""Real training jobs as separate rank processes (`python -m ds_moekd.train`), for tests that send
signals, stop or kill ranks: each rank is its own OS process on a free loopback port, exactly as a
launcher starts them (torchrun-style RANK/WORLD_SIZE environment)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("DS_MOEKD_DEBUG", None)
    env.update(extra or {})
    return env


def tiny_overrides(tiny_demo: Path, out: Path, name: str = "rel", steps: int = 6, **extra) -> list[str]:
    """A few-second run of the tiny demo workload (no validation, no held-out report)."""
    items = {
        "name": name, "output_dir": str(out), "train.steps": steps, "data.micro_batch_size": 2,
        "data.train_file": f"{tiny_demo}/data/train.jsonl", "data.valid_file": f"{tiny_demo}/data/valid.jsonl",
        "teacher.path": f"{tiny_demo}/teacher", "student.path": f"{tiny_demo}/student",
        "student.deepspeed_config": f"{REPO}/ds_configs/zero3_cpu.json", "report.eval_examples": 0,
        "validation.every": 0, **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def start_ranks(overrides: list[str], world: int = 2, env: dict | None = None, log_dir: Path | None = None,
                module: str = "ds_moekd.train", args: tuple[str, ...] = ()):
    """Start `world` rank processes of `module` (its `args`, then the kd config and `overrides`);
    their stderr goes to log_dir/rank{r}.log."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = run_env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                            "MASTER_PORT": str(port), **(env or {})})
        log = open(log_dir / f"rank{rank}.log", "w") if log_dir else subprocess.DEVNULL
        procs.append(subprocess.Popen(
            [sys.executable, "-m", module, *args, "--config", str(REPO / "ds_configs/methods/kd.yaml"), *overrides],
            env=rank_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def wait_all(procs, timeout_s: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def wait_for_step(metrics: Path, step: int, procs, timeout_s: float = 300) -> None:
    """Block until metrics.jsonl has a line for `step` (or a rank exits: then fail)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file():
            lines = [line for line in metrics.read_text().splitlines() if line.strip()]
            try:
                if lines and json.loads(lines[-1])["step"] >= step:
                    return
            except ValueError:
                pass
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: codes {[p.poll() for p in procs]}")
        time.sleep(0.2)
    for p in procs:
        p.kill()
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def run_once(overrides: list[str], log_dir: Path, world: int = 2, timeout_s: float = 300) -> tuple[list[int], str]:
    """Run a job to its end: (exit codes by rank, rank logs joined)."""
    procs = start_ranks(overrides, world=world, log_dir=log_dir)
    codes = wait_all(procs, timeout_s)
    return codes, "\n".join((log_dir / f"rank{r}.log").read_text() for r in range(world))


def stop(procs, sig=signal.SIGKILL) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        p.wait()
