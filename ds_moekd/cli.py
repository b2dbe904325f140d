"""`ds-moekd` command line: train, teacher-cache, demo build, eval, report, compare, plan, bench, convert.

Every command runs under one top-level handler (ds_moekd/run/errors.py): a failure prints a short
message and exits non-zero; `--debug` (anywhere) or DS_MOEKD_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import sys

from ds_moekd.run.errors import run_command


def main(argv: list[str] | None = None) -> None:
    run_command(_main, sys.argv[1:] if argv is None else list(argv), "ds-moekd")


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd", description="Distil Mixture-of-Experts teachers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a student (also runs under deepspeed/torchrun)", add_help=False)
    sub.add_parser("teacher-cache", help="run the teacher once and keep its top-k targets for off-policy training",
                   add_help=False)
    demo = sub.add_parser("demo", help="the embedded demo workload")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    demo_sub.add_parser("build", help="build the demo dataset, tokenizer, teacher and student", add_help=False)
    sub.add_parser("eval", help="score a model on instruction data (ROUGE-L, exact match)", add_help=False)
    sub.add_parser("report", help="compare runs and evaluation results: report.md + plots", add_help=False)
    sub.add_parser("compare", help="train every method on several seeds and report them side by side",
                   add_help=False)
    sub.add_parser("plan", help="per-GPU memory and FLOPs of a run, from config files only", add_help=False)
    sub.add_parser("bench", help="benchmarks: moe-layer, teacher, loss, ka, placement, e2e", add_help=False)
    sub.add_parser("convert", help="rewrite a model folder's pickle (.bin) weights as safetensors", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from ds_moekd.train import main as train_main

        train_main(rest)
    elif args.command == "teacher-cache":
        from ds_moekd.cache.build import main as cache_main

        cache_main(rest)
    elif args.command == "demo" and args.demo_command == "build":
        from ds_moekd.demo.build import main as build_main

        build_main(rest)
    elif args.command == "eval":
        from ds_moekd.eval.cli import main as eval_main
        from ds_moekd.runtime.dist import shutdown

        try:
            eval_main(rest)
        finally:
            shutdown()
    elif args.command == "report":
        from ds_moekd.reporting.runs_report import main as report_main

        report_main(rest)
    elif args.command == "compare":
        from ds_moekd.comparison.cli import main as compare_main

        compare_main(rest)
    elif args.command == "plan":
        from ds_moekd.planning.plan import main as plan_main

        plan_main(rest)
    elif args.command == "bench":
        from ds_moekd.bench.cli import main as bench_main

        bench_main(rest)
    elif args.command == "convert":
        from ds_moekd.modelfiles.convert import main as convert_main

        convert_main(rest)


if __name__ == "__main__":
    main()
