"""A long kd run stays flat: per-rank resident memory (RSS), open file descriptors and the run
folder's disk use, sampled over a run of the embedded demo under `deepspeed` with 2 ranks, with a
checkpoint every 100 steps and `train.keep_checkpoints: 3` (docs/reliability.md, "Long runs").

    python benchmarks/long_run_flat.py [--steps 2000] [--every-s 2] [--runs-dir runs/long-run-flat] \
        [--out benchmarks/results/cpu-2core]

Writes long_run_rss_fds_disk_kd.json (the samples and the verdict) and .png (the three curves
against the training step). Growth compares the median of the samples in the last tenth of the
steps with the median of those just after warm-up (the first tenth of the steps); disk is bounded
when it never exceeds one more checkpoint than are kept (a new one is written before the oldest
is removed) plus the run's other files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import psutil

REPO = Path(__file__).resolve().parents[1]
NAME = "long_run_rss_fds_disk_kd"
SAVE_EVERY, KEEP = 100, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(steps: int, run_dir: Path, log) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "--module", "ds_moekd.train", "--config", str(REPO / "ds_configs/methods/kd.yaml"),
               f"train.steps={steps}", f"train.save_every={SAVE_EVERY}", f"train.keep_checkpoints={KEEP}",
               "validation.every=0", "report.eval_examples=0", "train.log_every=1", "train.overwrite=true",
               f"output_dir={run_dir.parent}", f"name={run_dir.name}"]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def ranks(runner: psutil.Process) -> dict[int, psutil.Process]:
    """The rank processes below the runner, by local rank (deepspeed passes --local_rank=R)."""
    found = {}
    for proc in runner.children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        local_rank = [a.split("=")[1] for a in cmd if a.startswith("--local_rank=")]
        if "ds_moekd.train" in cmd and local_rank:  # not launch.py, which names the module too
            found[int(local_rank[0])] = proc
    return found


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a checkpoint being pruned
                pass
    return total


def last_step(metrics: Path) -> int:
    try:
        with metrics.open("rb") as f:
            f.seek(max(0, metrics.stat().st_size - 4096))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.startswith("{")]
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def sample(procs: dict[int, psutil.Process], run_dir: Path) -> dict | None:
    row = {"t": time.time(), "step": last_step(run_dir / "metrics.jsonl"), "disk_bytes": folder_bytes(run_dir),
           "checkpoint_bytes": folder_bytes(run_dir / "checkpoints")}
    try:
        for rank, proc in procs.items():
            row[f"rank{rank}_rss_mb"] = proc.memory_info().rss / 2**20
            row[f"rank{rank}_fds"] = proc.num_fds()
    except psutil.Error:
        return None  # a rank just ended
    return row


def growth(samples: list[dict], key: str, steps: int) -> dict:
    early = [s[key] for s in samples if steps * 0.1 <= s["step"] <= steps * 0.2]
    late = [s[key] for s in samples if s["step"] >= steps * 0.9]
    if not early or not late:
        return {"after_warmup": None, "end": None, "growth_pct": None}
    a, b = median(early), median(late)
    return {"after_warmup": a, "end": b, "growth_pct": 100 * (b - a) / a}


def plot(samples: list[dict], summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    steps = [s["step"] for s in samples]
    for rank in (0, 1):
        axes[0].plot(steps, [s[f"rank{rank}_rss_mb"] for s in samples], label=f"rank {rank}")
        axes[1].plot(steps, [s[f"rank{rank}_fds"] for s in samples], label=f"rank {rank}")
    axes[2].plot(steps, [s["disk_bytes"] / 2**20 for s in samples], label="run folder")
    axes[2].plot(steps, [s["checkpoint_bytes"] / 2**20 for s in samples], label="checkpoints/")
    axes[2].axhline(summary["disk_bound_bytes"] / 2**20, color="grey", linestyle="--",
                    label=f"bound: {KEEP + 1} checkpoints + other files")
    for ax, label in zip(axes, ("RSS (MiB)", "open file descriptors", "disk (MiB)"), strict=True):
        ax.set_ylabel(label)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("training step")
    fig.suptitle(f"kd on the demo, 2 ranks: checkpoint every {SAVE_EVERY} steps, keep {KEEP}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every-s", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "long-run-flat"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/cpu-2core"))
    args = parser.parse_args(argv)
    run_dir, out = Path(args.runs_dir) / "kd", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out / f"{NAME}.log", "w") as log:
        runner = launch(args.steps, run_dir, log)
        samples, procs = [], {}
        while runner.poll() is None:
            procs = procs if len(procs) == 2 and all(p.is_running() for p in procs.values()) else \
                ranks(psutil.Process(runner.pid))
            if len(procs) == 2 and (row := sample(procs, run_dir)) is not None and row["step"] > 0:
                samples.append(row)
            time.sleep(args.every_s)
    if runner.returncode != 0:
        sys.exit(f"the run failed (exit {runner.returncode}); see {out / f'{NAME}.log'}")
    (out / f"{NAME}.log").unlink()
    one_checkpoint = max(s["checkpoint_bytes"] for s in samples if s["step"] < 2 * SAVE_EVERY)
    other = max(s["disk_bytes"] - s["checkpoint_bytes"] for s in samples)
    summary = {
        "steps": args.steps, "save_every": SAVE_EVERY, "keep_checkpoints": KEEP, "wall_s": time.time() - start,
        "samples": len(samples), "device": f"CPU, {psutil.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "rss_mb": {f"rank{r}": growth(samples, f"rank{r}_rss_mb", args.steps) for r in (0, 1)},
        "fds": {f"rank{r}": growth(samples, f"rank{r}_fds", args.steps) for r in (0, 1)},
        "one_checkpoint_bytes": one_checkpoint, "disk_bound_bytes": (KEEP + 1) * one_checkpoint + other,
        "disk_max_bytes": max(s["disk_bytes"] for s in samples),
        "checkpoints_at_end": sorted(p.name for p in (run_dir / "checkpoints").glob("step*")),
    }
    growths = [g["growth_pct"] for part in ("rss_mb", "fds") for g in summary[part].values()]
    summary["flat"] = all(g is not None and g <= 5.0 for g in growths)
    summary["disk_bounded"] = summary["disk_max_bytes"] <= summary["disk_bound_bytes"]
    (out / f"{NAME}.json").write_text(json.dumps({"summary": summary, "samples": samples}, indent=1) + "\n")
    plot(samples, summary, out / f"{NAME}.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
