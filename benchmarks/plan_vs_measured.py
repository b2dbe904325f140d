"""The plan's per-rank peak against the measured peak resident set of short CPU KD runs, at
several teacher sizes and EP 1/2. Writes benchmarks/results/cpu-2core/plan_vs_measured.{json,md}.

    python benchmarks/plan_vs_measured.py --work /tmp/plan-check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ds_moekd.bench.plan_check import measure
from ds_moekd.bench.random_teacher import build_random_teacher
from ds_moekd.demo.build import build_demo

RESULTS = Path(__file__).resolve().parent / "results/cpu-2core"
# (name, layers, hidden, expert width, world size): the 4-layer one is the ~300 MB teacher
SIZES = [("demo-tiny", None, None, None, 1), ("t2x512", 2, 512, 1408, 1), ("t4x512", 4, 512, 1408, 1),
         ("t8x512", 8, 512, 1408, 1), ("t4x512-ep2", 4, 512, 1408, 2), ("t8x512-ep2", 8, 512, 1408, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for models and runs")
    args = parser.parse_args()
    demo = args.work / "tiny"
    if not (demo / "student").is_dir():
        build_demo(demo, seed=0, size="tiny", threads=1, log=lambda _: None)
    rows = []
    for name, layers, hidden, inter, world in SIZES:
        teacher = demo / "teacher" if layers is None else build_random_teacher(
            args.work / f"teacher-{layers}x{hidden}", demo / "teacher", layers=layers, hidden=hidden, inter=inter)
        rows.append(measure(name, args.work / "runs", demo, teacher, world))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_vs_measured.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| run | ranks | teacher MB | measured peak MiB | plan MiB | error |", "|---|---|---|---|---|---|"]
    table += [f"| {r['name']} | {r['world_size']} | {r['teacher_mb']:.0f} | {r['measured_peak_mib']:.0f} | "
              f"{r['plan_peak_mib']:.0f} | {100 * r['error']:+.1f}% |" for r in rows]
    (RESULTS / "plan_vs_measured.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
