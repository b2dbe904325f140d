"""`ds-moekd bench e2e`: tokens/s and peak memory per rank of whole distillation steps, ds-moekd
against the authors'-style baseline on the same models and batches (ds_moekd/bench/e2e_worker.py
describes both), measured in the same session. By default (`--interleave steps`) both systems live in the same
ranks and alternate step by step (the order swapping every step), so both see the same load from
other jobs; their peak resident sets come from short runs of each system alone, each a fresh set
of CPU ranks (or GPUs) under torchrun. `--interleave runs` alternates whole runs instead (ours,
baseline, ours, ...). Ratios are ours / baseline; the first `--skip` steps of each run are warm-up.
Several methods (`--method kd --method ka`, or `--method kd,ka,sar`) interleave too: each round
runs every method's pair before the next round.

    ds-moekd bench e2e --method kd,ka,sar --size demo --size random-300mb --out benchmarks/results/cpu-2core/e2e

writes OUT_<method>.{json,md,png} per method, and OUT_methods.md (one table) for several.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ds_moekd.methods import METHODS as REGISTERED
from ds_moekd.modelfiles.assets import CHECKOUT, DS_CONFIGS
from ds_moekd.reporting.plots import e2e_speed_and_memory
from ds_moekd.runtime.dist import free_loopback_port

SIZES = ("demo", "random-300mb")
METHODS = tuple(name for name, cls in REGISTERED.items() if cls.needs_teacher)  # each has a baseline step


def teacher_for(size: str, work: Path) -> str:
    """The teacher of a size: the shipped demo teacher, or a random-weight Mixtral of ~300 MB fp32
    (4 layers, hidden 512, 8 experts of 1408) with the demo's tokenizer."""
    if size == "demo":
        return "demo:teacher"
    from ds_moekd.bench.random_teacher import build_random_teacher
    from ds_moekd.modelfiles.assets import resolve_path

    return str(build_random_teacher(work / "teacher-4x512-8x1408", resolve_path("demo:student")))


def method_config(method: str, args) -> Path:
    """The run config of a method: --config, else the method's shipped demo config."""
    return args.config or DS_CONFIGS / "methods" / f"{method}.yaml"


def run_system(system: str, method: str, args, teacher: str, work: Path, tag: str,
               steps: int | None = None) -> dict[str, list[dict]]:
    """{system: per-rank records} of one torchrun (system `both`: ours and baseline, step by step)."""
    out = work / tag
    steps = steps or args.steps
    overrides = [f"method={method}", f"teacher.path={teacher}", f"data.micro_batch_size={args.micro_batch}",
                 f"teacher.ep_size={args.ranks}", f"train.steps={steps}", *args.overrides]
    port = str(free_loopback_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if env.get("DS_ACCELERATOR", "cpu") == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr",
           "127.0.0.1", "--master_port", port, "-m", "ds_moekd.bench.e2e_worker", "--system", system,
           "--config", str(method_config(method, args)), "--steps", str(steps), "--out", str(out),
           "--threads", str(args.threads), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench e2e: the {system} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if system != "both":
        return {system: [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(args.ranks)]}
    return {name: [json.loads(Path(f"{out}-{name}.rank{r}.json").read_text()) for r in range(args.ranks)]
            for name in ("ours", "baseline")}


def summarise(ranks: list[dict], skip: int) -> dict:
    rank0 = ranks[0]  # step times are barrier to barrier, the same on every rank
    seconds, tokens = sum(rank0["step_s"][skip:]), sum(rank0["tokens"][skip:])
    measured = rank0.get("phases", [])[skip:]
    # mean seconds per step of each phase (rollout, router step, teacher, student), per rank
    phases = [{k: sum(p.get(k, 0.0) for p in r.get("phases", [])[skip:]) / max(len(measured), 1)
               for k in sorted({k for p in r.get("phases", [])[skip:] for k in p})} for r in ranks]
    return {"tokens_per_s": tokens / seconds, "measured_steps": len(rank0["step_s"]) - skip,
            "step_s": seconds / max(len(rank0["step_s"]) - skip, 1), "phase_s_per_rank": phases,
            "peak_rss_mib_per_rank": [r["peak_rss_bytes"] / 2**20 for r in ranks],
            "first_losses": rank0["loss"][:3]}


def bench_size(size: str, methods: list[str], args, work: Path) -> dict[str, dict]:
    """{method: result} at one size; rounds interleave every method's ours/baseline pair."""
    teacher = teacher_for(size, work)
    runs = {m: {"ours": [], "baseline": []} for m in methods}
    for round_index in range(args.rounds):
        for method in methods:
            tag = f"{size}-{method}-{{}}-{round_index}"
            if args.interleave == "runs":
                summaries = {system: summarise(run_system(system, method, args, teacher, work, tag.format(system))[system],
                                               args.skip) for system in ("ours", "baseline")}
            else:  # speed from one run alternating step by step; peak memory from short runs of each alone
                both = run_system("both", method, args, teacher, work, tag.format("both"))
                summaries = {system: summarise(both[system], args.skip) for system in ("ours", "baseline")}
                for system in ("ours", "baseline"):  # peak memory hardly depends on the load: first round only
                    if not args.memory_steps:  # speed only: the peaks stay those of the shared run
                        continue
                    if round_index == 0:
                        alone = run_system(system, method, args, teacher, work, tag.format(system), args.memory_steps)
                        peak = [r["peak_rss_bytes"] / 2**20 for r in alone[system]]
                    else:
                        peak = runs[method][system][0]["peak_rss_mib_per_rank"]
                    summaries[system]["peak_rss_mib_per_rank"] = peak
            for system, summary in summaries.items():
                runs[method][system].append(summary)
                print(f"[{size} {method}] round {round_index + 1} {system}: {summary['tokens_per_s']:.0f} tokens/s, "
                      f"peak {max(summary['peak_rss_mib_per_rank']):.0f} MiB/rank", flush=True)
    name = teacher if size == "demo" else "random Mixtral, 4 layers, hidden 512, 8 experts of 1408 (fp32)"
    results = {}
    for method, by_system in runs.items():
        median = {s: statistics.median(r["tokens_per_s"] for r in by_system[s]) for s in by_system}
        peak = {s: statistics.median(max(r["peak_rss_mib_per_rank"]) for r in by_system[s]) for s in by_system}
        results[method] = {
            "method": method, "size": size, "teacher": name, "runs": by_system, "median_tokens_per_s": median,
            "median_peak_rss_mib_per_rank": peak, "tokens_per_s_ratio": median["ours"] / median["baseline"],
            "per_run_ratios": [o["tokens_per_s"] / b["tokens_per_s"]
                               for o, b in zip(by_system["ours"], by_system["baseline"], strict=True)],
            "peak_memory_ratio": peak["ours"] / peak["baseline"]}
    return results


def plot(results: list[dict], path: Path) -> None:
    systems = ("ours", "baseline")
    e2e_speed_and_memory(path, [f"{r.get('method', 'kd')}\n{r['size']}" for r in results],
                         {s: [r["median_tokens_per_s"][s] for r in results] for s in systems},
                         {s: [r["median_peak_rss_mib_per_rank"][s] for r in results] for s in systems})


TARGETS = {"demo": 0.9, "random-300mb": 1.0}  # the CPU targets of ours/baseline tokens/s (docs/scale-out.md)


def table(results: list[dict]) -> str:
    rows = ["| method | size | ours tokens/s | baseline tokens/s | ratio (target) | per-run ratios | ours peak MiB/rank "
            "| baseline peak MiB/rank | memory ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, m = r["median_tokens_per_s"], r["median_peak_rss_mib_per_rank"]
        per_run = ", ".join(f"{x:.2f}" for x in r.get("per_run_ratios", []))
        rows.append(f"| {r.get('method', 'kd')} | {r['size']} | {t['ours']:.0f} | {t['baseline']:.0f} | "
                    f"{r['tokens_per_s_ratio']:.2f}x (>= {TARGETS.get(r['size'], 1.0)}x) | {per_run} | {m['ours']:.0f} | "
                    f"{m['baseline']:.0f} | {r['peak_memory_ratio']:.2f}x |")
    return "\n".join(rows)


def _shown(value):
    """Settings as recorded: paths inside the checkout relative to it (no machine paths in results)."""
    if not isinstance(value, Path):
        return value
    return str(value.resolve().relative_to(CHECKOUT)) if value.resolve().is_relative_to(CHECKOUT) else value.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", help=f"distillation method(s), comma-separated or repeated, "
                        f"of {', '.join(METHODS)} (default: kd)")
    parser.add_argument("--size", action="append", choices=SIZES, help="model sizes (default: both)")
    parser.add_argument("--config", type=Path, default=None,
                        help="run config giving data, student and settings (default: ds_configs/methods/<method>.yaml)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of each run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each system")
    parser.add_argument("--interleave", choices=("steps", "runs"), default="steps",
                        help="steps: both systems in the same ranks, alternating step by step (robust to other jobs "
                             "on the machine), peak memory from short runs of each alone; runs: ours, baseline, ... "
                             "as separate runs")
    parser.add_argument("--memory-steps", type=int, default=12,
                        help="steps of the peak-memory runs (--interleave steps; first round only); 0: no such runs, "
                             "the peaks are then those of the step-interleaved run, which holds both systems")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT_<method>.{json,md,png}")
    parser.add_argument("overrides", nargs="*", help="run config overrides for both systems")
    args = parser.parse_args(argv)
    methods = [m for value in (args.method or ["kd"]) for m in value.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"bench e2e: --method {','.join(unknown)}: no authors'-style baseline (one of {METHODS})")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        by_size = [bench_size(size, methods, args, work) for size in (args.size or SIZES)]
    results = [r[m] for m in methods for r in by_size]
    for r in results:
        print(f"{r['method']} {r['size']}: ours/baseline tokens/s {r['tokens_per_s_ratio']:.2f}x, "
              f"peak memory per rank {r['peak_memory_ratio']:.2f}x")
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for method in methods:
            mine = [r for r in results if r["method"] == method]
            settings = {k: _shown(v) for k, v in vars(args).items() if k not in ("out", "work", "method")}
            settings.update(method=method, config=_shown(method_config(method, args)))
            stem = args.out.with_name(f"{args.out.name}_{method}")
            stem.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": mine}, indent=1))
            stem.with_suffix(".md").write_text(table(mine) + "\n")
            plot(mine, stem.with_suffix(".png"))
        if len(methods) > 1:
            args.out.with_name(f"{args.out.name}_methods.md").write_text(table(results) + "\n")
