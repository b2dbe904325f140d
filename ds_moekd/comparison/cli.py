"""`ds-moekd compare`: the paper's protocol on any set of method configs (docs/comparison.md).

    ds-moekd compare [--methods sft kd gkd all ka sar] [--seeds 3] [--eval-seeds 5] [--out runs/compare]
                     [--init sft_init | --init none] [a.b=c ...]

Per training seed s: stage 0 fine-tunes the student on the training split (the `--init` config, seed
s); every method then starts from that SFT init with seed s, so one seed's runs share their init and
data order and differ only in how they distil. Each final student (or the best on the validation
split, where its config keeps one) and the teacher are scored on the held-out file, greedy and
sampled at temperature 1 over `--eval-seeds` seeds. `--methods` names configs in `--config-dir`
(one NAME.yaml each, its `method:` field says which method it runs), so a variant of a method is one
more file. Trailing `a.b=c` overrides go to every run. Finished runs and scores are kept, so a stopped
comparison continues where it left off; results land in OUT/comparison.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ds_moekd.comparison.runs import RunSpec, run_one
from ds_moekd.config import RunConfig, load_config
from ds_moekd.data.synthetic import read_jsonl
from ds_moekd.methods import METHODS
from ds_moekd.methods.sar import EXPORT_DIR as TUNED_TEACHER_DIR
from ds_moekd.modelfiles.assets import DS_CONFIGS, resolve_path
from ds_moekd.reporting.heldout import scored_student
from ds_moekd.run.atomic import write_text
from ds_moekd.runtime.telemetry import read_metrics

# Put before the user's overrides: the comparison scores every student itself on the held-out file,
# so each run's own before/after scoring (report.eval_examples) would only repeat that work.
RUN_DEFAULTS = ["report.eval_examples=0"]
INIT = "init"  # the label of the stage-0 runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-moekd compare", description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="config names in --config-dir, one row each (default: the six methods)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 1, 2, ... (default 3)")
    p.add_argument("--eval-seeds", type=int, default=5, help="sampling seeds per held-out evaluation (default 5)")
    p.add_argument("--init", default="sft_init",
                   help="config in --config-dir that trains each seed's student init (none: start every "
                        "method from the configs' own student.path)")
    p.add_argument("--out", default="runs/compare", help="folder for runs/, logs/, comparison.json, report.md")
    p.add_argument("--config-dir", default=str(DS_CONFIGS / "methods"), help="one NAME.yaml per row")
    p.add_argument("--world-size", type=int, default=2, help="ranks per run (default 2)")
    p.add_argument("--eval-file", default="demo:data/test.jsonl", help="held-out records (with `family` for the breakdown)")
    p.add_argument("--eval-examples", type=int, default=0, help="the first N records (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=200")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.world_size < 1 or args.eval_seeds < 1:
        p.error("--seeds, --eval-seeds and --world-size must be at least 1")
    if INIT in args.methods:
        p.error(f"--methods: {INIT!r} is the name of the stage-0 rows; rename that config")
    return args


def _cached(path: Path, key: dict, compute):
    """compute() once per `key` (the settings it depends on); its JSON is kept beside what it describes."""
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["value"]
    value = compute()
    write_text(path, json.dumps({"key": key, "value": value}, indent=2) + "\n")
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


def train_all(args, config_dir: Path, runs_dir: Path, overrides: list[str]
              ) -> tuple[list[RunSpec], list[RunSpec], dict]:
    """Per seed: the init run, then every method from the init's student. Returns the init runs, the
    method runs and {run name: wall seconds} of the runs trained now."""
    inits, specs, seconds = [], [], {}
    for seed in range(1, args.seeds + 1):
        start_from = []
        if args.init != "none":
            init = RunSpec(INIT, config_dir / f"{args.init}.yaml", seed)
            seconds[init.name] = run_one(init, runs_dir, Path(args.out) / "logs", args.world_size, overrides)
            start_from = [f"student.path={scored_student(runs_dir / init.name / 'student_hf')[0].resolve()}"]
            inits.append(init)
        for label in args.methods:
            spec = RunSpec(label, config_dir / f"{label}.yaml", seed)
            seconds[spec.name] = run_one(spec, runs_dir, Path(args.out) / "logs", args.world_size,
                                         [*overrides, *start_from])
            specs.append(spec)
    return inits, specs, {name: s for name, s in seconds.items() if s is not None}


def _run_row(spec: RunSpec, method: str, run_dir: Path, score) -> dict:
    model_dir, checkpoint = scored_student(run_dir / "student_hf")
    step_s, memory = _run_cost(run_dir)
    return {"name": spec.name, "label": spec.label, "method": method, "seed": spec.seed,
            "checkpoint": checkpoint, "scores": score(run_dir / "comparison_scores.json", model_dir),
            "step_s": step_s, "peak_memory_mb": memory}


def main(argv=None) -> Path:
    from ds_moekd.comparison.scoring import router_movement, score_student, score_teacher
    from ds_moekd.reporting.comparison_report import write_comparison_report

    args = parse_args(argv)
    started = time.time()
    out, config_dir = Path(args.out), Path(args.config_dir)
    runs_dir = out / "runs"
    run_overrides = [*RUN_DEFAULTS, *args.overrides]
    configs = [load_config(config_dir / f"{label}.yaml", run_overrides) for label in args.methods]
    methods = {label: cfg.method for label, cfg in zip(args.methods, configs, strict=True)}
    if args.init != "none":  # read before training: a bad init config fails before any run starts
        methods[INIT] = load_config(config_dir / f"{args.init}.yaml", run_overrides).method
    init_specs, specs, trained = train_all(args, config_dir, runs_dir, run_overrides)

    records = read_jsonl(resolve_path(args.eval_file))
    records = records[: args.eval_examples] if args.eval_examples else records
    eval_seeds = list(range(1, args.eval_seeds + 1))
    key = {"eval_file": args.eval_file, "records": len(records), "max_new_tokens": args.max_new_tokens,
           "eval_seeds": eval_seeds}

    def score(path: Path, model_dir: Path) -> dict:
        return _cached(path, {**key, "model": str(model_dir.name)},
                       lambda: score_student(model_dir, records, args.max_new_tokens, eval_seeds))

    with_teacher = teacher_source(configs)
    teacher_dir = resolve_path(with_teacher.teacher.path)
    print("[compare] scoring the teacher (native, all, KA) and the base student")
    teacher = _cached(out / "teacher_scores.json", key, lambda: score_teacher(
        teacher_dir, records, args.max_new_tokens, with_teacher.ka.resample_prob, eval_seeds))
    student_base = score(out / "student_scores.json", resolve_path(configs[0].student.path))
    inits = {}
    for spec in init_specs:
        print(f"[compare] scoring {spec.name}")
        inits[spec.name] = _run_row(spec, methods[INIT], runs_dir / spec.name, score)
    runs = {}
    for spec in specs:
        run_dir = runs_dir / spec.name
        print(f"[compare] scoring {spec.name}")
        runs[spec.name] = _run_row(spec, methods[spec.label], run_dir, score)
        if (run_dir / TUNED_TEACHER_DIR).is_dir():
            runs[spec.name]["router_movement"] = _cached(
                run_dir / "router_movement.json", key,
                lambda run_dir=run_dir: router_movement(teacher_dir, run_dir / TUNED_TEACHER_DIR, records))
    data = {"settings": {"methods": args.methods, "init": args.init, "seeds": list(range(1, args.seeds + 1)),
                         "eval_seeds": eval_seeds, "world_size": args.world_size, "overrides": run_overrides,
                         "eval_file": args.eval_file, "eval_records": len(records),
                         "max_new_tokens": args.max_new_tokens, "trained_now_s": trained,
                         "wall_s": round(time.time() - started, 1)},
            "teacher": teacher, "student_base": student_base, "inits": inits, "runs": runs}
    write_text(out / "comparison.json", json.dumps(data, indent=2) + "\n")
    report = write_comparison_report(data, runs_dir, out)
    print(f"[compare] wrote {report}")
    return report


if __name__ == "__main__":
    main()
