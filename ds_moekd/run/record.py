"""End of a run: HF export, `run.json` (read from the live objects) and `report.md`."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time

import deepspeed
import torch
import torch.distributed as dist
import transformers
from transformers import GenerationConfig

import ds_moekd
from ds_moekd.config import RunConfig
from ds_moekd.modelfiles.locate import resolve_model
from ds_moekd.reporting.heldout import evaluate_held_out
from ds_moekd.reporting.run_report import write_run_report
from ds_moekd.run.atomic import write_text
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.host import numerics_facts
from ds_moekd.runtime.telemetry import phase
from ds_moekd.student.export import export_hf
from ds_moekd.student.zero3 import partitioned_parameter_counts


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gather(obj, groups: ParallelGroups) -> list:
    if groups.world_group is None:
        return [obj]
    out = [None] * groups.world_size
    dist.all_gather_object(out, obj)
    return out


def _teacher_facts(teacher) -> dict | None:
    if teacher is None:
        return None
    return {
        "local_expert_ids": list(teacher.local_expert_ids),
        "expert_param_bytes": int(teacher.expert_param_bytes),
        "checkpoint_bytes_read": int(teacher.bytes_read),
    }


def _generation_config(student_path, tokenizer) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(student_path)
    except OSError:  # the source checkpoint has none: derive one from the tokenizer
        return GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def finish_run(cfg: RunConfig, engine, teacher, tokenizer, groups: ParallelGroups, dataset, start_time: float) -> dict:
    run_dir = cfg.run_dir
    student_path = resolve_model(cfg.student.path)
    export_dir = run_dir / "student_hf"
    with phase("Hugging Face export"):
        export_hf(engine, tokenizer, export_dir, groups, _generation_config(student_path, tokenizer),
                  merge_lora=cfg.student.lora.merge)

    train_wall_s = time.time() - start_time
    with phase("held-out evaluation: teacher, undistilled and distilled student"):
        held_out = evaluate_held_out(cfg, tokenizer, teacher, groups, student_path, export_dir, engine.device)
    local_params, total_params = partitioned_parameter_counts(engine)
    per_rank = _gather(
        {"rank": groups.rank, "student_partitioned_params": local_params, "teacher": _teacher_facts(teacher)},
        groups,
    )
    record = None
    if groups.rank == 0:
        record = {
            "name": cfg.name,
            "method": cfg.method,
            "world_size": groups.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "student_total_params": total_params,
            "teacher_ep_size": teacher.ep_size if teacher is not None else None,
            "teacher_num_experts": teacher.num_experts if teacher is not None else None,
            "teacher_cache": cfg.teacher.cache,  # the targets came from it: no teacher was loaded
            "per_rank": per_rank,
            "steps": cfg.train.steps,
            "global_batch_size": engine.train_batch_size(),
            "train_examples": len(dataset.examples),
            "dropped_long_prompts": dataset.dropped_long_prompts,
            "student_hf_dir": str(export_dir),
            "versions": {
                "ds_moekd": ds_moekd.__version__,
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                **{name: _version(name) for name in ("accelerate", "tokenizers", "safetensors", "numpy")},
            },
            "numerics": numerics_facts(),
            "train_wall_s": train_wall_s,
        }
        if held_out is not None:
            record["eval"] = held_out
        record["wall_s"] = time.time() - start_time
        write_text(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
        write_run_report(run_dir, record)
    if dist.is_initialized():
        dist.barrier()
    return record
