"""Every method on the embedded demo under `deepspeed` with 2 ranks (teacher EP 2, student ZeRO-3):
time per step relative to `kd` (and how much of it is rollout / SAR's router step), peak memory,
and the student's held-out scores. One run per method (plus `gkd` with layer-wise rollouts), one
after another on the same machine, so the ratios share conditions.

    python benchmarks/methods_demo.py [--steps 400] [--runs-dir runs/methods-demo] [--out benchmarks/results/cpu-2core]

Step times are means over the steps after the first tenth (warm-up). Scores are the run report's
held-out strict exact match / ROUGE-L (greedy, `report.eval_examples` test items) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = [  # (row name, config, extra overrides)
    ("sft", "sft", []),
    ("kd", "kd", []),
    ("gkd", "gkd", []),
    ("gkd (layerwise rollouts)", "gkd", ["gkd.rollout=layerwise", "name=gkd-layerwise"]),
    ("all", "all", []),
    ("ka", "ka", []),
    ("sar", "sar", []),
]
PHASES = ("rollout_s", "teacher_s", "student_s", "router_s")


def launch(config: str, overrides: list[str], steps: int, runs_dir: Path, port: int) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    command = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--module", "ds_moekd.train", "--config", str(REPO / f"ds_configs/methods/{config}.yaml"),
               f"train.steps={steps}", f"output_dir={runs_dir}", *overrides]
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise(run: Path) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = metrics[len(metrics) // 10:]
    record = json.loads((run / "run.json").read_text())

    def mean(key):
        return sum(m.get(key, 0.0) for m in steady) / len(steady)

    return {"steps": len(metrics), "step_s": mean("step_s"), **{k: mean(k) for k in PHASES},
            "tokens_per_s": sum(m["tokens"] for m in steady) / sum(m["step_s"] for m in steady),
            "peak_memory_mb": max(m["peak_memory_mb"] for m in metrics), "wall_s": record["wall_s"],
            "eval": record.get("eval")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "methods-demo"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu-2core"))
    parser.add_argument("--port", type=int, default=29531)
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    rows = {}
    for row, config, overrides in RUNS:
        print(f"{row}: training {args.steps} steps", file=sys.stderr, flush=True)
        launch(config, overrides, args.steps, runs_dir, args.port)
        name = next((o.split("=", 1)[1] for o in overrides if o.startswith("name=")), config)
        rows[row] = summarise(runs_dir / name)
    kd = rows["kd"]["step_s"]
    lines = [f"# Methods on the embedded demo: 2 ranks (EP-2 teacher, ZeRO-3 student), {args.steps} steps, CPU", "",
             "| method | s/step | vs kd | rollout s | teacher s | student s | router s | tokens/s | peak MB "
             "| strict EM before → after | ROUGE-L before → after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for row, r in rows.items():
        ev = r["eval"] or {}
        scores = [f"{ev['before'][m]:.2f} → {ev['after'][m]:.2f}" if ev else "-" for m in ("exact_match", "rouge_l")]
        lines.append(f"| {row} | {r['step_s']:.3f} | {r['step_s'] / kd:.2f} | {r['rollout_s']:.3f} | "
                     f"{r['teacher_s']:.3f} | {r['student_s']:.3f} | {r['router_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} | {scores[0]} | {scores[1]} |")
    report = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods_demo.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")
    (out / "methods_demo.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
