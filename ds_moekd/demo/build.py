"""Build the embedded demo workload: data, tokenizer, MoE teacher, dense student, scores, report.

    python -m ds_moekd.demo.build --out DIR [--seed S] [--size full|tiny] [--threads N]

Everything is bounded by step counts and seeded, and torch runs on a fixed number of threads, so
two builds on one machine with the same threads write identical files (except timings.json and
the timings in README.md).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from ds_moekd.data.synthetic import SPLITS, generate_splits, write_jsonl
from ds_moekd.demo.evaluate import expert_load, score_model
from ds_moekd.demo.models import StudentShape, TeacherShape, dense_teacher, split_into_experts, student
from ds_moekd.demo.report import write_report
from ds_moekd.demo.tokenizer import train_tokenizer
from ds_moekd.demo.train import Stage, encode_records, train


@dataclass(frozen=True)
class BuildPlan:
    per_family: dict[str, int]
    teacher: TeacherShape
    student: StudentShape
    dense_stage: Stage
    moe_stage: Stage
    student_stage: Stage
    max_new_tokens: int = 16


PLANS = {
    # Calibrated on a shared 2-core CPU machine (1 thread): ~15-20 minutes in all. The student is
    # trained briefly on purpose, so the teacher clearly beats it and distillation has room to work.
    "full": BuildPlan(
        per_family={"train": 6000, "valid": 50, "test": 100},
        teacher=TeacherShape(hidden=128, layers=4, heads=4, num_experts=8, expert_intermediate=256, top_k=2),
        student=StudentShape(hidden=64, layers=2, heads=4, intermediate=256),
        dense_stage=Stage(steps=400, batch_size=64, lr=3e-3, warmup=40),
        moe_stage=Stage(steps=5000, batch_size=64, lr=3e-3, warmup=40),
        student_stage=Stage(steps=250, batch_size=64, lr=3e-3, warmup=25),
    ),
    # Seconds, for tests: the same pipeline on toy shapes.
    "tiny": BuildPlan(
        per_family={"train": 40, "valid": 3, "test": 4},
        teacher=TeacherShape(hidden=32, layers=2, heads=2, num_experts=4, expert_intermediate=16, top_k=2),
        student=StudentShape(hidden=16, layers=1, heads=2, intermediate=32),
        dense_stage=Stage(steps=4, batch_size=8, lr=1e-3, warmup=1),
        moe_stage=Stage(steps=4, batch_size=8, lr=1e-3, warmup=1),
        student_stage=Stage(steps=4, batch_size=8, lr=1e-3, warmup=1),
        max_new_tokens=6,
    ),
}


def _save(model, tokenizer, directory: Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _active_parameters(moe) -> int:
    """Parameters one token uses under native top-k routing (k of the N experts in each layer)."""
    n, k = moe.config.num_local_experts, moe.config.num_experts_per_tok
    experts = sum(p.numel() for layer in moe.model.layers for p in layer.mlp.experts.parameters())
    return _parameters(moe) - experts * (n - k) // n


def build_demo(out_dir: str | Path, seed: int = 0, size: str = "full", threads: int = 1, log=print) -> dict:
    """Write the demo workload into out_dir and return its scores (also in out_dir/scores.json)."""
    if size not in PLANS:
        raise ValueError(f"size={size!r}: choose one of {sorted(PLANS)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(PLANS[size], Path(out_dir), seed, size, threads, log)
    finally:
        torch.set_num_threads(previous_threads)


def _build(plan: BuildPlan, out: Path, seed: int, size: str, threads: int, log) -> dict:
    timings: dict[str, float] = {}
    clock = time.time()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.time() - clock, 1)
        clock = time.time()
        log(f"[build] {name} done in {timings[name]}s")

    splits = generate_splits(plan.per_family, seed=seed)
    for split in SPLITS:
        write_jsonl(splits[split], out / "data" / f"{split}.jsonl")
    tokenizer = train_tokenizer(splits["train"])  # training split only, never valid/test
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    examples = encode_records(splits["train"], tokenizer)
    lap("data_and_tokenizer")

    torch.manual_seed(seed)
    dense = dense_teacher(plan.teacher, len(tokenizer), special)
    stages = {"dense": train(dense, examples, plan.dense_stage, tokenizer.pad_token_id, seed + 1, log, "dense")}
    lap("dense_pretraining")
    teacher = split_into_experts(dense, plan.teacher, torch.Generator().manual_seed(seed + 2))
    teacher.config.output_router_logits = True  # adds the load-balancing loss while training
    stages["moe"] = train(teacher, examples, plan.moe_stage, tokenizer.pad_token_id, seed + 3, log, "moe")
    teacher.config.output_router_logits = False
    _save(teacher, tokenizer, out / "teacher")
    lap("moe_training")

    torch.manual_seed(seed + 4)
    pupil = student(plan.student, len(tokenizer), special)
    stages["student"] = train(pupil, examples, plan.student_stage, tokenizer.pad_token_id, seed + 5, log, "student")
    _save(pupil, tokenizer, out / "student")
    lap("student_training")

    # Score what was saved: reload from disk, the teacher once per routing width.
    num_experts, top_k = plan.teacher.num_experts, plan.teacher.top_k
    routings = {f"teacher_top{top_k}": top_k, f"teacher_top{num_experts - 1}": num_experts - 1,
                f"teacher_all{num_experts}": num_experts}
    evaluations, params = {}, {}
    for name, k in routings.items():
        model = AutoModelForCausalLM.from_pretrained(out / "teacher", num_experts_per_tok=k)
        evaluations[name] = score_model(model, tokenizer, splits["test"], max_new_tokens=plan.max_new_tokens)
        log(f"[build] {name}: exact match {evaluations[name]['exact_match']}")
        if k == top_k:
            middle = plan.teacher.layers // 2
            load = {"layer": middle, "per_family": expert_load(model, tokenizer, splits["test"], middle)}
            params["teacher"] = {"total": _parameters(model), "active_per_token": _active_parameters(model)}
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    evaluations["student"] = score_model(model, tokenizer, splits["test"], max_new_tokens=plan.max_new_tokens)
    log(f"[build] student: exact match {evaluations['student']['exact_match']}")
    params["student"] = {"total": _parameters(model), "active_per_token": _parameters(model)}
    for role in ("teacher", "student"):
        params[role]["safetensors_bytes"] = (out / role / "model.safetensors").stat().st_size
    lap("evaluation")

    scores = {
        "seed": seed, "size": size, "torch_threads": threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "split": "test", "records": {split: len(splits[split]) for split in SPLITS},
        "vocab_size": len(tokenizer), "plan": asdict(plan), "training": stages,
        "parameters": params, "evaluations": evaluations, "expert_load": load,
    }
    timings["total"] = round(sum(timings.values()), 1)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    write_report(out / "README.md", scores, timings)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds-moekd demo build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(PLANS), default="full")
    # One thread by default: on a shared machine, multi-threaded small matmuls stall on each other.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fix it to reproduce a build)")
    args = parser.parse_args(argv)
    build_demo(args.out, seed=args.seed, size=args.size, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
