"""`ds-moekd bench e2e`: tokens/s and peak memory per rank of whole distillation steps, ds-moekd
against the authors'-style baseline on the same models and batches (ds_moekd/bench/e2e_worker.py
describes both), measured in the same session as interleaved runs: ours, baseline, ours, ...
Each run is a fresh set of CPU ranks (or GPUs) under torchrun, so each system's peak resident
set is its own. Ratios are ours / baseline; the first `--skip` steps of each run are warm-up.

    ds-moekd bench e2e --method kd --size demo --size random-300mb --out benchmarks/results/cpu-2core/e2e_kd
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZES = ("demo", "random-300mb")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def teacher_for(size: str, work: Path) -> str:
    """The teacher of a size: the shipped demo teacher, or a random-weight Mixtral of ~300 MB fp32
    (4 layers, hidden 512, 8 experts of 1408) with the demo's tokenizer."""
    if size == "demo":
        return "demo:teacher"
    from ds_moekd.assets import resolve_path
    from ds_moekd.bench.random_teacher import build_random_teacher

    return str(build_random_teacher(work / "teacher-4x512-8x1408", resolve_path("demo:student")))


def run_system(system: str, args, teacher: str, work: Path, tag: str) -> list[dict]:
    out = work / tag
    overrides = [f"method={args.method}", f"teacher.path={teacher}", f"data.micro_batch_size={args.micro_batch}",
                 f"teacher.ep_size={args.ranks}", f"train.steps={args.steps}", *args.overrides]
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if env.get("DS_ACCELERATOR", "cpu") == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr",
           "127.0.0.1", "--master_port", port, "-m", "ds_moekd.bench.e2e_worker", "--system", system,
           "--config", str(args.config), "--steps", str(args.steps), "--out", str(out),
           "--threads", str(args.threads), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench e2e: the {system} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(args.ranks)]


def summarise(ranks: list[dict], skip: int) -> dict:
    rank0 = ranks[0]  # step times are barrier to barrier, the same on every rank
    seconds, tokens = sum(rank0["step_s"][skip:]), sum(rank0["tokens"][skip:])
    return {"tokens_per_s": tokens / seconds, "measured_steps": len(rank0["step_s"]) - skip,
            "peak_rss_mib_per_rank": [r["peak_rss_bytes"] / 2**20 for r in ranks],
            "first_losses": rank0["loss"][:3]}


def bench_size(size: str, args, work: Path) -> dict:
    teacher = teacher_for(size, work)
    runs = {"ours": [], "baseline": []}
    for round_index in range(args.rounds):
        for system in ("ours", "baseline"):
            summary = summarise(run_system(system, args, teacher, work, f"{size}-{system}-{round_index}"), args.skip)
            runs[system].append(summary)
            print(f"[{size}] round {round_index + 1} {system}: {summary['tokens_per_s']:.0f} tokens/s, peak "
                  f"{max(summary['peak_rss_mib_per_rank']):.0f} MiB/rank", flush=True)
    median = {s: statistics.median(r["tokens_per_s"] for r in runs[s]) for s in runs}
    peak = {s: statistics.median(max(r["peak_rss_mib_per_rank"]) for r in runs[s]) for s in runs}
    name = teacher if size == "demo" else "random Mixtral, 4 layers, hidden 512, 8 experts of 1408 (fp32)"
    return {"size": size, "teacher": name, "runs": runs, "median_tokens_per_s": median,
            "median_peak_rss_mib_per_rank": peak, "tokens_per_s_ratio": median["ours"] / median["baseline"],
            "peak_memory_ratio": peak["ours"] / peak["baseline"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["size"] for r in results]
    x = range(len(names))
    for offset, system in ((-0.2, "ours"), (0.2, "baseline")):
        ax_speed.bar([i + offset for i in x], [r["median_tokens_per_s"][system] for r in results], 0.4, label=system)
        ax_mem.bar([i + offset for i in x], [r["median_peak_rss_mib_per_rank"][system] for r in results], 0.4,
                   label=system)
    for ax, title in ((ax_speed, "tokens/s (median of runs)"), (ax_mem, "peak memory per rank (MiB)")):
        ax.set_xticks(list(x), names)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


TARGETS = {"demo": 0.9, "random-300mb": 1.0}  # the CPU targets of ours/baseline tokens/s (docs/scale-out.md)


def table(results: list[dict]) -> str:
    rows = ["| size | ours tokens/s | baseline tokens/s | ratio (target) | ours peak MiB/rank | baseline peak MiB/rank "
            "| memory ratio |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t, m = r["median_tokens_per_s"], r["median_peak_rss_mib_per_rank"]
        rows.append(f"| {r['size']} | {t['ours']:.0f} | {t['baseline']:.0f} | {r['tokens_per_s_ratio']:.2f}x "
                    f"(>= {TARGETS.get(r['size'], 1.0)}x) | {m['ours']:.0f} | {m['baseline']:.0f} | "
                    f"{r['peak_memory_ratio']:.2f}x |")
    return "\n".join(rows)


def _shown(value):
    """Settings as recorded: paths inside the checkout relative to it (no machine paths in results)."""
    if not isinstance(value, Path):
        return value
    return str(value.resolve().relative_to(REPO)) if value.resolve().is_relative_to(REPO) else value.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="kd", help="distillation method (kd: the one with a baseline)")
    parser.add_argument("--size", action="append", choices=SIZES, help="model sizes (default: both)")
    parser.add_argument("--config", type=Path, default=REPO / "ds_configs/quickstart.yaml",
                        help="run config giving data, student and settings (default: the demo quickstart)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of each run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each system")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.png")
    parser.add_argument("overrides", nargs="*", help="run config overrides for both systems")
    args = parser.parse_args(argv)
    if args.method != "kd":
        raise SystemExit(f"bench e2e: --method {args.method}: only kd has an authors'-style baseline so far")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [bench_size(size, args, work) for size in (args.size or SIZES)]
    for r in results:
        print(f"{r['size']}: ours/baseline tokens/s {r['tokens_per_s_ratio']:.2f}x, "
              f"peak memory per rank {r['peak_memory_ratio']:.2f}x")
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: _shown(v) for k, v in vars(args).items() if k not in ("out", "work")}
        args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
        args.out.with_suffix(".md").write_text(table(results) + "\n")
        plot(results, args.out.with_suffix(".png"))
