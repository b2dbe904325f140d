"""Offline teacher cache numbers (docs/teacher-cache.md) on the ~300 MB random Mixtral teacher
(4 layers, hidden 512, 8 experts of 1408) with the demo's data and student, 2 CPU ranks (EP 2):

  1. cache build tokens/s, bytes per response token and the teacher probability left outside the
     kept tokens, for top-k 16, 64, 256 (native routing);
  2. kd training tokens/s and peak memory of rank 0 from the top-64 cache against the live EP
     teacher, whole runs alternated (live, cache, live, cache, ...) so both see the same machine.

    python benchmarks/teacher_cache.py --work /tmp/tc-bench

writes benchmarks/results/cpu-2core/teacher_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ds_moekd.bench.random_teacher import build_random_teacher
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.runtime.dist import free_loopback_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results/cpu-2core"
CONFIG = REPO / "ds_configs/methods/kd.yaml"
TOP_KS = (16, 64, 256)
TRAIN_TOP_K = 64


def torchrun(module: str, args: list[str], log: Path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_loopback_port()), "-m", module, *args]
    with log.open("w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        raise SystemExit(f"{module} failed ({code}); see {log}")


def mean_tail_mass(cache: Path, routing: str = "native") -> float:
    """The teacher probability the kept top-k leaves out, averaged over response tokens."""
    tails = [load_file(str(path))[f"{routing}.tail"] for path in sorted((cache / "shards").glob("*.safetensors"))]
    return torch.cat(tails).exp().mean().item()


def train_numbers(run: Path, skip: int) -> dict:
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][skip:]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
            "teacher_s": statistics.median(s["teacher_s"] for s in steps),
            "peak_memory_mb": max(s["peak_memory_mb"] for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the teacher, caches, runs")
    parser.add_argument("--examples", type=int, default=2048, help="training examples (the demo's first N)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=3, help="live/cache pairs of training runs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "train.jsonl"
    lines = resolve_path("demo:data/train.jsonl").read_text().splitlines()[: args.examples]
    data.write_text("\n".join(lines) + "\n")
    teacher = build_random_teacher(args.work / "teacher-4x512-8x1408", resolve_path("demo:student"))
    common = [f"data.train_file={data}", f"teacher.path={teacher}", "teacher.ep_size=2", "validation.every=0",
              "report.eval_examples=0", f"train.steps={args.steps}", "data.micro_batch_size=8", "name=kd",
              "optim.warmup_steps=0"]
    builds = {}
    for k in TOP_KS:
        cache = args.work / f"cache-k{k}"
        torchrun("ds_moekd.cache.build", ["--config", str(CONFIG), *common, "--out", str(cache), "--top-k", str(k),
                                          "--overwrite"], args.work / f"build-k{k}.log")
        builds[k] = {**json.loads((cache / "build.json").read_text()), "mean_tail_mass": mean_tail_mass(cache)}
        print(f"build top-{k}: {builds[k]['tokens_per_s']:.0f} tokens/s, {builds[k]['bytes_per_token']:.0f} B/token",
              flush=True)
    runs = {"live": [], "cache": []}
    for r in range(args.rounds):
        for source in ("live", "cache"):
            out = args.work / f"runs-{source}-{r}"
            extra = [f"teacher.cache={args.work / f'cache-k{TRAIN_TOP_K}'}"] if source == "cache" else []
            torchrun("ds_moekd.train", ["--config", str(CONFIG), *common, f"output_dir={out}", "train.overwrite=true",
                                        *extra], args.work / f"train-{source}-{r}.log")
            runs[source].append(train_numbers(out / "kd", args.skip))
            print(source, r, runs[source][-1], flush=True)
    ratios = [c["tokens_per_s"] / lv["tokens_per_s"] for lv, c in zip(runs["live"], runs["cache"], strict=True)]
    memory = [c["peak_memory_mb"] / lv["peak_memory_mb"] for lv, c in zip(runs["live"], runs["cache"], strict=True)]
    result = {"teacher": "random Mixtral 4x512, 8 experts of 1408 (~300 MB fp32)", "examples": args.examples,
              "ranks": 2, "builds": builds, "train": runs, "train_top_k": TRAIN_TOP_K,
              "cache_over_live_tokens_per_s": ratios, "cache_over_live_peak_memory": memory}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "teacher_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    table = ["| top-k | build tokens/s (2 ranks) | bytes per token | cache size MB | mean tail mass |",
             "|---|---|---|---|---|"]
    table += [f"| {k} | {b['tokens_per_s']:.0f} | {b['bytes_per_token']:.0f} | {b['bytes'] / 1e6:.1f} | "
              f"{b['mean_tail_mass']:.3f} |" for k, b in builds.items()]
    table += ["", f"kd training, {args.steps} steps x {args.rounds} rounds (medians after {args.skip} warm-up steps):", "",
              "| round | live tokens/s | cache tokens/s | ratio | live peak MB (rank 0) | cache peak MB | ratio |",
              "|---|---|---|---|---|---|---|"]
    table += [f"| {r} | {lv['tokens_per_s']:.0f} | {c['tokens_per_s']:.0f} | {ratios[r]:.2f}x | "
              f"{lv['peak_memory_mb']:.0f} | {c['peak_memory_mb']:.0f} | {memory[r]:.2f}x |"
              for r, (lv, c) in enumerate(zip(runs["live"], runs["cache"], strict=True))]
    (RESULTS / "teacher_cache.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
