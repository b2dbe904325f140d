"""`ds-moekd compare`: train every method on several seeds, score each student and the teacher on
the held-out split, and write a report (docs/comparison.md).

    ds-moekd compare [--methods sft kd gkd all ka sar] [--seeds 3] [--out runs/compare] [a.b=c ...]

Trailing `a.b=c` overrides go to every run. Finished runs and scores are kept, so a stopped
comparison continues where it left off; results land in OUT/comparison.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ds_moekd.assets import resolve_path
from ds_moekd.atomic import write_text
from ds_moekd.comparison.runs import RunSpec, run_all
from ds_moekd.config import METHODS, RunConfig, load_config
from ds_moekd.data.synthetic import read_jsonl
from ds_moekd.telemetry import read_metrics

REPO = Path(__file__).resolve().parents[2]
# Put before the user's overrides: the comparison scores every student itself on the held-out file,
# so each run's own before/after scoring (report.eval_examples) would only repeat that work.
RUN_DEFAULTS = ["report.eval_examples=0"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-moekd compare", description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method: 1, 2, ... (default 3)")
    p.add_argument("--out", default="runs/compare", help="folder for runs/, logs/, comparison.json, report.md")
    p.add_argument("--config-dir", default=str(REPO / "ds_configs" / "methods"), help="one METHOD.yaml per method")
    p.add_argument("--world-size", type=int, default=2, help="ranks per run (default 2)")
    p.add_argument("--eval-file", default="demo:data/test.jsonl", help="held-out records (with `family` for the breakdown)")
    p.add_argument("--eval-examples", type=int, default=0, help="the first N records (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=200")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.world_size < 1:
        p.error("--seeds and --world-size must be at least 1")
    return args


def _cached(path: Path, compute):
    """compute() once; its JSON is kept beside what it describes."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_text(path, json.dumps(value, indent=2) + "\n")
    return value


def _run_cost(run_dir: Path) -> tuple[float, float]:
    """(mean seconds per step after the first tenth (warm-up), peak memory MB of rank 0)."""
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steady = metrics[len(metrics) // 10:] or metrics
    return sum(m["step_s"] for m in steady) / len(steady), max(m["peak_memory_mb"] for m in metrics)


def teacher_source(configs: list) -> RunConfig:
    """The config the teacher rows are scored from: the first that names a teacher (sft's need not)."""
    for cfg in configs:
        if cfg.teacher.path:
            return cfg
    raise ValueError(f"compare: none of the configs ({', '.join(c.name for c in configs)}) names a teacher.path")


def main(argv=None) -> Path:
    from ds_moekd.comparison.report import write_comparison_report
    from ds_moekd.comparison.scoring import sar_gate_mass, score_student, score_teacher

    args = parse_args(argv)
    out, config_dir = Path(args.out), Path(args.config_dir)
    runs_dir = out / "runs"
    specs = [RunSpec(method, seed) for seed in range(1, args.seeds + 1) for method in args.methods]
    run_overrides = [*RUN_DEFAULTS, *args.overrides]
    trained = run_all(specs, config_dir, runs_dir, out / "logs", args.world_size, run_overrides)
    records = read_jsonl(resolve_path(args.eval_file))
    records = records[: args.eval_examples] if args.eval_examples else records
    configs = [load_config(config_dir / f"{method}.yaml", run_overrides) for method in args.methods]
    with_teacher = teacher_source(configs)
    print("[compare] scoring the teacher (native, all, KA) and the undistilled student")
    teacher = _cached(out / "teacher_scores.json", lambda: score_teacher(
        resolve_path(with_teacher.teacher.path), records, args.max_new_tokens, with_teacher.ka.resample_prob))
    student_before = _cached(out / "student_scores.json", lambda: score_student(
        resolve_path(configs[0].student.path), records, args.max_new_tokens))
    runs = {}
    for spec in specs:
        run_dir = runs_dir / spec.name
        print(f"[compare] scoring {spec.name}")
        scores = _cached(run_dir / "comparison_scores.json",
                         lambda run_dir=run_dir: score_student(run_dir / "student_hf", records, args.max_new_tokens))
        step_s, memory = _run_cost(run_dir)
        runs[spec.name] = {"name": spec.name, "method": spec.method, "seed": spec.seed, "scores": scores,
                           "step_s": step_s, "peak_memory_mb": memory}
        if (run_dir / "sar_teacher_hf").is_dir():
            runs[spec.name]["sar_gate_mass"] = _cached(run_dir / "sar_gate_mass.json",
                                                       lambda run_dir=run_dir: sar_gate_mass(run_dir / "sar_teacher_hf",
                                                                                             records))
    data = {"settings": {"methods": args.methods, "seeds": list(range(1, args.seeds + 1)),
                         "world_size": args.world_size, "overrides": run_overrides, "eval_file": args.eval_file,
                         "eval_records": len(records), "max_new_tokens": args.max_new_tokens,
                         "trained_now_s": trained},
            "teacher": teacher, "student_before": student_before, "runs": runs}
    write_text(out / "comparison.json", json.dumps(data, indent=2) + "\n")
    report = write_comparison_report(data, runs_dir, out)
    print(f"[compare] wrote {report}")
    return report


if __name__ == "__main__":
    main()
