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
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ds_moekd.bench.random_teacher import SIZES as RANDOM_SIZES
from ds_moekd.methods import METHODS as REGISTERED
from ds_moekd.modelfiles.assets import CHECKOUT, DS_CONFIGS
from ds_moekd.reporting.plots import e2e_cost_curves, e2e_speed_and_memory
from ds_moekd.runtime.dist import free_loopback_port

SIZES = ("demo", *RANDOM_SIZES)
METHODS = tuple(name for name, cls in REGISTERED.items() if cls.needs_teacher)  # each has a baseline step


def models_for(size: str, work: Path) -> tuple[str, str | None]:
    """(teacher, student) of a size: the shipped demo teacher and the config's student, or a
    random-weight Mixtral of the size (fp32, 8 experts) and a random Llama student of about 1/8 its
    parameters (ds_moekd/bench/random_teacher.py), both with the demo's tokenizer."""
    if size == "demo":
        return "demo:teacher", None
    from ds_moekd.bench.random_teacher import build_random_student, build_random_teacher, student_shape
    from ds_moekd.modelfiles.assets import resolve_path

    layers, hidden, inter = RANDOM_SIZES[size]
    tokenizer = resolve_path("demo:student")
    teacher = build_random_teacher(work / f"teacher-{layers}x{hidden}-8x{inter}", tokenizer, layers=layers,
                                   hidden=hidden, inter=inter)
    shape = student_shape(layers, hidden, inter)
    student = build_random_student(work / f"student-{shape['layers']}x{shape['hidden']}-{shape['inter']}", tokenizer,
                                   **shape)
    return str(teacher), str(student)


def machine_memory_gib() -> float:
    return int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 2**20


def planned_mib(method: str, args, teacher: str, student: str | None, baseline: bool) -> float:
    """`ds-moekd plan`'s peak per rank for the run bench e2e starts (CPU, fp32), before it starts."""
    from ds_moekd.config import load_config
    from ds_moekd.planning.plan import plan

    cfg = load_config(method_config(method, args), run_overrides(method, args, teacher, student))
    return plan(cfg, args.ranks, "cpu", baseline=baseline)["device_total_bytes"] / 2**20


def run_overrides(method: str, args, teacher: str, student: str | None, steps: int | None = None) -> list[str]:
    return [f"method={method}", f"teacher.path={teacher}", f"data.micro_batch_size={args.micro_batch}",
            f"teacher.ep_size={args.ranks}", f"train.steps={steps or args.steps}",
            *([f"student.path={student}"] if student else []), *args.overrides]


def method_config(method: str, args) -> Path:
    """The run config of a method: --config, else the method's shipped demo config."""
    return args.config or DS_CONFIGS / "methods" / f"{method}.yaml"


def run_system(system: str, method: str, args, models: tuple[str, str | None], work: Path, tag: str,
               steps: int | None = None, memory_limit_gib: float | None = None) -> dict[str, list[dict]]:
    """{system: per-rank records} of one torchrun (system `both`: ours and baseline, step by step)."""
    out = work / tag
    steps = steps or args.steps
    overrides = run_overrides(method, args, *models, steps)
    port = str(free_loopback_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if env.get("DS_ACCELERATOR", "cpu") == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr",
           "127.0.0.1", "--master_port", port, "-m", "ds_moekd.bench.e2e_worker", "--system", system,
           "--config", str(method_config(method, args)), "--steps", str(steps), "--out", str(out),
           "--threads", str(args.threads),
           *(["--memory-limit-gib", str(limit)] if (limit := memory_limit_gib or args.memory_limit_gib)
             and system == "baseline" else []), *overrides]
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


def one_round(method: str, args, models, work: Path, tag: str, first: bool, runs: dict) -> dict[str, dict]:
    """{system: summary} of one round of a method's ours/baseline pair."""
    if args.interleave == "runs":
        return {system: summarise(run_system(system, method, args, models, work, tag.format(system))[system],
                                  args.skip) for system in ("ours", "baseline")}
    # speed from one run alternating step by step; peak memory from short runs of each alone
    both = run_system("both", method, args, models, work, tag.format("both"))
    summaries = {system: summarise(both[system], args.skip) for system in ("ours", "baseline")}
    for system in ("ours", "baseline"):  # peak memory hardly depends on the load: first round only
        if not args.memory_steps:  # speed only: the peaks stay those of the shared run
            continue
        if first:
            alone = run_system(system, method, args, models, work, tag.format(system), args.memory_steps)
            peak = [r["peak_rss_bytes"] / 2**20 for r in alone[system]]
        else:
            peak = runs[system][0]["peak_rss_mib_per_rank"]
        summaries[system]["peak_rss_mib_per_rank"] = peak
    return summaries


def ours_alone(method: str, args, models, work: Path, tag: str) -> dict[str, dict]:
    """A size whose baseline does not fit this machine: ours runs alone, then the baseline is tried
    once under a per-rank address-space limit (this machine's memory / ranks) and its failure kept."""
    summaries = {"ours": summarise(run_system("ours", method, args, models, work, tag.format("ours"))["ours"],
                                   args.skip)}
    try:
        limit = args.memory_limit_gib or machine_memory_gib() / args.ranks
        baseline = run_system("baseline", method, args, models, work, tag.format("baseline"),
                              memory_limit_gib=limit)["baseline"]
        summaries["baseline"] = summarise(baseline, args.skip)
    except RuntimeError as exc:
        summaries["baseline"] = {"failed": failure_reason(str(exc))}
    return summaries


def failure_reason(output: str) -> str:
    """The line of a failed run's output that says why: an allocation that failed, else its last error
    (torchrun's own ChildFailedError only says that a rank failed)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    memory = [line for line in lines if "memory" in line.lower() or "allocat" in line.lower()]
    errors = [line for line in lines if "Error" in line and "ChildFailedError" not in line]
    reason = (memory or errors or lines or ["no output"])[-1]
    return re.sub(r"/(?:[^/\s<>'\"]+/)+([^/\s<>'\"]+)", r"\1", reason)[:300]  # file names, not machine paths


def bench_size(size: str, methods: list[str], args, work: Path) -> dict[str, dict]:
    """{method: result} at one size; rounds interleave every method's ours/baseline pair. Each result
    carries `ds-moekd plan`'s peak per rank for both systems, computed before any run starts."""
    models = models_for(size, work)
    budget_mib = machine_memory_gib() * 2**10 / args.ranks
    planned = {m: {"ours": planned_mib(m, args, *models, baseline=False),
                   "baseline": planned_mib(m, args, *models, baseline=True)} for m in methods}
    runs = {m: {"ours": [], "baseline": []} for m in methods}
    for round_index in range(args.rounds):
        for method in methods:
            tag = f"{size}-{method}-{{}}-{round_index}"
            if planned[method]["baseline"] > budget_mib:
                print(f"[{size} {method}] plan: the baseline needs {planned[method]['baseline']:.0f} MiB per rank, "
                      f"over this machine's {budget_mib:.0f} MiB per rank: ours runs alone", flush=True)
                summaries = ours_alone(method, args, models, work, tag)
            else:
                summaries = one_round(method, args, models, work, tag, round_index == 0, runs[method])
            for system, summary in summaries.items():
                runs[method][system].append(summary)
                print(f"[{size} {method}] round {round_index + 1} {system}: "
                      + (f"failed: {summary['failed']}" if "failed" in summary else
                         f"{summary['tokens_per_s']:.0f} tokens/s, peak {max(summary['peak_rss_mib_per_rank']):.0f} "
                         "MiB/rank"), flush=True)
    name = models[0] if size == "demo" else f"random Mixtral {size} ({RANDOM_SIZES[size]}: layers, hidden, " \
        "expert width; 8 experts, fp32)"
    return {method: summarise_method(method, size, name, by_system, planned[method])
            for method, by_system in runs.items()}


def summarise_method(method: str, size: str, teacher: str, by_system: dict, planned: dict) -> dict:
    """Medians over rounds and ours/baseline ratios; a system that failed every round has None."""
    done = {s: [r for r in rounds if "failed" not in r] for s, rounds in by_system.items()}
    median = {s: statistics.median(r["tokens_per_s"] for r in rs) if rs else None for s, rs in done.items()}
    peak = {s: statistics.median(max(r["peak_rss_mib_per_rank"]) for r in rs) if rs else None
            for s, rs in done.items()}
    both = median["baseline"] is not None
    return {
        "method": method, "size": size, "teacher": teacher, "runs": by_system, "median_tokens_per_s": median,
        "median_peak_rss_mib_per_rank": peak, "plan_peak_mib_per_rank": planned,
        "tokens_per_s_ratio": median["ours"] / median["baseline"] if both else None,
        "per_run_ratios": [o["tokens_per_s"] / b["tokens_per_s"] for o, b in
                           zip(done["ours"], done["baseline"], strict=False)] if both else [],
        "peak_memory_ratio": peak["ours"] / peak["baseline"] if both else None,
        "baseline_failed": [r["failed"] for r in by_system["baseline"] if "failed" in r]}


def plot(results: list[dict], path: Path) -> None:
    """Bars per case; with several random sizes, curves of tokens/s and peak memory against size."""
    systems = ("ours", "baseline")
    curves = [r for r in results if r["size"] in RANDOM_SIZES]
    if len({r["size"] for r in curves}) > 1:
        e2e_cost_curves(path, [teacher_gb(r["size"]) for r in curves], [r["method"] for r in curves],
                        {s: [r["median_tokens_per_s"][s] for r in curves] for s in systems},
                        {s: [r["median_peak_rss_mib_per_rank"][s] for r in curves] for s in systems})
        return
    e2e_speed_and_memory(path, [f"{r.get('method', 'kd')}\n{r['size']}" for r in results],
                         {s: [r["median_tokens_per_s"][s] or 0.0 for r in results] for s in systems},
                         {s: [r["median_peak_rss_mib_per_rank"][s] or 0.0 for r in results] for s in systems})


def teacher_gb(size: str) -> float:
    """A random size's fp32 teacher in GB (1e9 bytes), from its shape."""
    from ds_moekd.bench.random_teacher import teacher_params

    return 4 * teacher_params(*RANDOM_SIZES[size]) / 1e9


# ours/baseline targets (docs/scale-out.md): tokens/s on 2 CPU ranks by size, and from 1 GB up per
# method, with the peak memory per rank at most 0.6x the baseline's
TARGETS = {"demo": 0.9, "random-300mb": 1.0}
LARGE_TARGETS = {"kd": 1.0, "ka": 1.2, "sar": 1.2}
LARGE_MEMORY_TARGET = 0.6


def target_of(r: dict) -> tuple[float, float | None]:
    if r["size"] in RANDOM_SIZES and teacher_gb(r["size"]) >= 1.0:
        return LARGE_TARGETS.get(r["method"], 1.0), LARGE_MEMORY_TARGET
    return TARGETS.get(r["size"], 1.0), None


def _fmt(value, spec: str = ".0f", none: str = "-") -> str:
    """`value` formatted (a ratio, spec ".2f", gets its x), or `none` when there is none."""
    if value is None:
        return none
    return format(value, spec) + ("x" if spec == ".2f" else "")


def _verdict(value, at_least) -> str:
    """': met' / ': not met' for value >= at_least; nothing when either is unknown."""
    if value is None or at_least is None:
        return ""
    return ": met" if value >= at_least else ": not met"


def table(results: list[dict]) -> str:
    rows = ["| method | size | ours tokens/s | baseline tokens/s | ratio (target) | per-run ratios | ours peak MiB/rank "
            "(plan) | baseline peak MiB/rank (plan) | memory ratio (target) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, m, plan = r["median_tokens_per_s"], r["median_peak_rss_mib_per_rank"], r.get("plan_peak_mib_per_rank", {})
        speed_target, memory_target = target_of(r)
        failed = r.get("baseline_failed") or []
        baseline = f"failed: {failed[0]}" if t["baseline"] is None and failed else _fmt(t["baseline"])
        per_run = ", ".join(f"{x:.2f}" for x in r.get("per_run_ratios", []))
        rows.append(f"| {r.get('method', 'kd')} | {r['size']} | {_fmt(t['ours'])} | {baseline} | "
                    f"{_fmt(r['tokens_per_s_ratio'], '.2f')} (>= {speed_target}x{_verdict(r['tokens_per_s_ratio'], speed_target)}) "
                    f"| {per_run} | {_fmt(m['ours'])} "
                    f"({_fmt(plan.get('ours'))}) | {_fmt(m['baseline'])} ({_fmt(plan.get('baseline'))}) | "
                    f"{_fmt(r['peak_memory_ratio'], '.2f')}" + (f" (<= {memory_target}x"
                    f"{_verdict(memory_target, r['peak_memory_ratio'])})" if memory_target else "")
                    + " |")
    return "\n".join(rows)


def phase_table(results: list[dict]) -> str:
    """Where the time goes: seconds per step of each phase, rank 0, median over rounds, per system."""
    rows = ["| method | size | system | step s | " + " | ".join(PHASES) + " |", "|---|---|---|---|" + "---|" * len(PHASES)]
    for r in results:
        for system, rounds in r["runs"].items():
            done = [x for x in rounds if "failed" not in x]
            if not done:
                continue
            phase = {k: statistics.median(x["phase_s_per_rank"][0].get(k, 0.0) for x in done) for k in PHASES}
            step = statistics.median(x["step_s"] for x in done)
            rows.append(f"| {r['method']} | {r['size']} | {system} | {step:.3f} | "
                        + " | ".join(f"{phase[k]:.3f}" for k in PHASES) + " |")
    return "\n".join(rows)


PHASES = ("rollout_s", "router_s", "teacher_s", "student_s")


def _shown(value):
    """Settings as recorded: paths inside the checkout relative to it (no machine paths in results)."""
    if not isinstance(value, Path):
        return value
    return str(value.resolve().relative_to(CHECKOUT)) if value.resolve().is_relative_to(CHECKOUT) else value.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", help=f"distillation method(s), comma-separated or repeated, "
                        f"of {', '.join(METHODS)} (default: kd)")
    parser.add_argument("--size", action="append", choices=SIZES,
                        help="model sizes (default: demo and random-300mb); random-* are random Mixtral teachers "
                             "of that size with a student of about 1/8 of it")
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
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="address-space limit of each baseline rank; default: this machine's memory / ranks for "
                             "sizes whose baseline `plan` says does not fit (it is then tried once, alone)")
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
        by_size = [bench_size(size, methods, args, work) for size in (args.size or SIZES[:2])]
    results = [r[m] for m in methods for r in by_size]
    for r in results:
        print(f"{r['method']} {r['size']}: ours/baseline tokens/s {_fmt(r['tokens_per_s_ratio'], '.2f')}, "
              f"peak memory per rank {_fmt(r['peak_memory_ratio'], '.2f')}"
              + (f"; the baseline failed: {r['baseline_failed'][0]}" if r["baseline_failed"] else ""))
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for method in methods:
            mine = [r for r in results if r["method"] == method]
            settings = {k: _shown(v) for k, v in vars(args).items() if k not in ("out", "work", "method")}
            settings.update(method=method, config=_shown(method_config(method, args)))
            stem = args.out.with_name(f"{args.out.name}_{method}")
            stem.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": mine}, indent=1))
            stem.with_suffix(".md").write_text(table(mine) + "\n\nWhere the time goes (seconds per step, rank 0):\n\n"
                                               + phase_table(mine) + "\n")
            plot(mine, stem.with_suffix(".png"))
        if len(methods) > 1:
            args.out.with_name(f"{args.out.name}_methods.md").write_text(
                table(results) + "\n\nWhere the time goes (seconds per step, rank 0):\n\n" + phase_table(results) + "\n")
