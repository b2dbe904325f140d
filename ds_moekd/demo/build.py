"""Build the embedded demo workload: data, tokenizer, MoE teacher, dense student, scores, report.

    python -m ds_moekd.demo.build --out DIR [--seed S] [--size full|tiny] [--threads N]

Everything is bounded by step counts and seeded, and torch runs on a fixed number of threads, so
two builds on one machine with the same threads write identical files (except timings.json and
the timings in README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from ds_moekd.data.synthetic import SPLITS, generate_splits, write_jsonl
from ds_moekd.decoding import HFForward
from ds_moekd.demo.assets_readme import write_report
from ds_moekd.demo.evaluate import expert_load, scores_by_family
from ds_moekd.demo.model_training import Stage, encode_records, train
from ds_moekd.demo.models import StudentShape, TeacherShape, dense_teacher, split_into_experts, student
from ds_moekd.demo.tokenizer import train_tokenizer


@dataclass(frozen=True)
class BuildPlan:
    per_family: dict[str, int]
    teacher: TeacherShape
    student: StudentShape
    dense_stage: Stage  # most of the teacher's compute, as LLaMA-MoE's dense pretraining
    moe_stage: Stage  # short: the unselected experts keep what the dense stage put in them
    student_stage: Stage  # the shipped (base) student: a short first pass over the data
    init_stage: Stage  # measured only: a copy of the base student fine-tuned like ds_configs/methods/sft_init.yaml
    router_scale: float = 1.0  # the split's router starts at its neuron-cluster centroids times this
    max_new_tokens: int = 16


# What the comparison needs of the demo (docs/comparison.md): a strong teacher whose unselected
# experts still matter, and an SFT-init student far enough below it for distillation to show.
TARGETS = {
    "teacher native strict EM": ("teacher_native_em", ">=", 60.0),
    "min over layers of router mass outside the top-k": ("min_gate_mass", ">=", 0.25),
    "mean per-token KL(native ‖ all), nats": ("kl_native_all", ">=", 0.05),
    "all-expert EM minus native EM": ("all_minus_native_em", ">=", -2.0),
    "teacher native EM minus SFT-init student EM": ("teacher_minus_init_em", ">=", 25.0),
}


PLANS = {
    # The LLaMA-MoE recipe on 2 CPU threads (about 25 minutes): most compute in the dense stage, a
    # short MoE stage from a soft router, a student the SFT init leaves far below the teacher.
    "full": BuildPlan(
        per_family={"train": 6000, "valid": 50, "test": 100},
        teacher=TeacherShape(hidden=128, layers=4, heads=4, num_experts=8, expert_intermediate=128, top_k=2),
        student=StudentShape(hidden=128, layers=2, heads=4, intermediate=384),
        dense_stage=Stage(steps=6000, batch_size=64, lr=3e-3, warmup=40),
        moe_stage=Stage(steps=250, batch_size=64, lr=1e-3, warmup=20),
        student_stage=Stage(steps=150, batch_size=32, lr=2e-3, warmup=20),
        init_stage=Stage(steps=600, batch_size=32, lr=2e-3, warmup=20),
        router_scale=0.3,
    ),
    # Seconds, for tests: the same pipeline on toy shapes.
    "tiny": BuildPlan(
        per_family={"train": 40, "valid": 3, "test": 4},
        teacher=TeacherShape(hidden=32, layers=2, heads=2, num_experts=4, expert_intermediate=16, top_k=2),
        student=StudentShape(hidden=16, layers=1, heads=2, intermediate=32),
        dense_stage=Stage(steps=4, batch_size=8, lr=1e-3, warmup=1),
        moe_stage=Stage(steps=4, batch_size=8, lr=1e-3, warmup=1),
        student_stage=Stage(steps=4, batch_size=8, lr=1e-3, warmup=1),
        init_stage=Stage(steps=2, batch_size=8, lr=1e-3, warmup=1),
        router_scale=0.3,
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
    teacher = split_into_experts(dense, plan.teacher, torch.Generator().manual_seed(seed + 2), plan.router_scale)
    teacher.config.output_router_logits = True  # adds the load-balancing loss while training
    stages["moe"] = train(teacher, examples, plan.moe_stage, tokenizer.pad_token_id, seed + 3, log, "moe")
    teacher.config.output_router_logits = False
    _save(teacher, tokenizer, out / "teacher")
    lap("moe_training")

    torch.manual_seed(seed + 4)
    pupil = student(plan.student, len(tokenizer), special)
    stages["student"] = train(pupil, examples, plan.student_stage, tokenizer.pad_token_id, seed + 5, log, "student")
    _save(pupil, tokenizer, out / "student")
    stages["student_init"] = train(pupil, examples, plan.init_stage, tokenizer.pad_token_id, seed + 6, log, "init")
    init_dir = out / "_student_init"  # scored below, not shipped
    _save(pupil, tokenizer, init_dir)
    lap("student_training")

    evaluations, params, load, routing = _evaluate(plan, out, init_dir, tokenizer, splits["test"], log)
    shutil.rmtree(init_dir)
    lap("evaluation")

    scores = {
        "seed": seed, "size": size, "torch_threads": threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "split": "test", "records": {split: len(splits[split]) for split in SPLITS},
        "vocab_size": len(tokenizer), "plan": asdict(plan), "training": stages,
        "parameters": params, "evaluations": evaluations, "expert_load": load, "teacher_routing": routing,
        "targets": target_results(evaluations, routing, plan.teacher.top_k, plan.teacher.num_experts),
    }
    timings["total"] = round(sum(timings.values()), 1)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    write_report(out / "README.md", scores, timings)
    return scores


def _evaluate(plan: BuildPlan, out: Path, init_dir: Path, tokenizer, test: list[dict], log):
    """Score what was saved, reloaded from disk: the teacher once per routing width, the base student and
    the measured SFT init; the teacher's routing diagnostics (gate mass, NLL, KL from native)."""
    from ds_moekd.comparison.scoring import gate_mass, routing_fit, teacher_routings
    from ds_moekd.teacher import MoETeacher

    num_experts, top_k = plan.teacher.num_experts, plan.teacher.top_k
    widths = {f"teacher_top{top_k}": top_k, f"teacher_top{num_experts - 1}": num_experts - 1,
              f"teacher_all{num_experts}": num_experts}
    evaluations, params = {}, {}
    for name, k in widths.items():
        model = AutoModelForCausalLM.from_pretrained(out / "teacher", num_experts_per_tok=k)
        (evaluations[name],) = scores_by_family(HFForward(model), tokenizer, test, max_new_tokens=plan.max_new_tokens)
        log(f"[build] {name}: exact match {evaluations[name]['exact_match']}")
        if k == top_k:
            middle = plan.teacher.layers // 2
            load = {"layer": middle, "per_family": expert_load(model, tokenizer, test, middle)}
            params["teacher"] = {"total": _parameters(model), "active_per_token": _active_parameters(model)}
    for name, directory in (("student", out / "student"), ("student_sft_init", init_dir)):
        model = AutoModelForCausalLM.from_pretrained(directory)
        (evaluations[name],) = scores_by_family(HFForward(model), tokenizer, test, max_new_tokens=plan.max_new_tokens)
        log(f"[build] {name}: exact match {evaluations[name]['exact_match']}")
    params["student"] = {"total": _parameters(model), "active_per_token": _parameters(model)}
    for role in ("teacher", "student"):
        params[role]["safetensors_bytes"] = (out / role / "model.safetensors").stat().st_size
    teacher = MoETeacher.from_pretrained(str(out / "teacher"))
    fit = routing_fit(teacher, tokenizer, test, teacher_routings(num_experts, resample_prob=0.05))
    routing = {"gate_mass": gate_mass(teacher, tokenizer, test),
               **{name: {k: round(v, 6) for k, v in values.items()} for name, values in fit.items()}}
    return evaluations, params, load, routing


def target_results(evaluations: dict, routing: dict, top_k: int, num_experts: int) -> dict:
    """Each of TARGETS with its measured value and whether it is met."""
    native = evaluations[f"teacher_top{top_k}"]["exact_match"]
    measured = {
        "teacher_native_em": native,
        "min_gate_mass": min(routing["gate_mass"]),
        "kl_native_all": routing["all"]["kl_from_native"],
        "all_minus_native_em": round(evaluations[f"teacher_all{num_experts}"]["exact_match"] - native, 2),
        "teacher_minus_init_em": round(native - evaluations["student_sft_init"]["exact_match"], 2),
    }
    return {name: {"value": measured[key], "target": f"{op} {bound}", "met": measured[key] >= bound}
            for name, (key, op, bound) in TARGETS.items()}


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
