"""The run report's held-out scores: teacher, undistilled student and distilled student on one set.

The set is `report.eval_file`, else `data.valid_file` unless validation picks the best checkpoint on
it (a set that chose the student cannot score it fairly; then there is no held-out row). The
distilled student is the best by validation when validation keeps one (`best_student_hf/`), else
the final export; the report names which. Greedy decoding through the eval pipeline (eval/runner.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ds_moekd.config import RunConfig
from ds_moekd.data.formats import EvalData, load_eval_data
from ds_moekd.decoding import HFForward
from ds_moekd.eval.runner import EvalSettings, evaluate
from ds_moekd.eval.validation import BEST_DIR
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.runtime.dist import ParallelGroups


def held_out_source(cfg: RunConfig) -> str | None:
    if cfg.report.eval_file:
        return cfg.report.eval_file
    if cfg.validation.every and cfg.validation.keep_best:
        return None  # data.valid_file chose the checkpoint
    return cfg.data.valid_file


def scored_student(final_dir: Path) -> tuple[Path, str]:
    """(folder, name) of the distilled student to score: the best by validation when this run's
    validation kept one (its validation.jsonl marks it; a best_student_hf/ left by an earlier run
    of the same name is not this run's), else the final export."""
    log_path = final_dir.parent / "validation.jsonl"
    scores = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
        if log_path.is_file() else []
    best = final_dir.parent / BEST_DIR
    if any(r.get("best") for r in scores) and (best / "best.json").is_file():
        chosen = json.loads((best / "best.json").read_text())
        return best, f"best by validation {chosen['metric']} (step {chosen['step']})"
    return final_dir, "final"


def _row(result: dict) -> dict:
    return {"examples": result["counts"]["evaluated"], "exact_match": result["exact_match_strict"]["mean"],
            "rouge_l": result["rouge_l"]["mean"]}


def _score_student(model_dir: Path, tokenizer, data: EvalData, settings: EvalSettings, device) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=str(device)).eval()
    return _row(evaluate(HFForward(model), tokenizer, data, settings, progress=False))


def evaluate_held_out(cfg: RunConfig, tokenizer, teacher, groups: ParallelGroups, before_dir: Path,
                      final_dir: Path, device: torch.device | str = "cpu") -> dict | None:
    """Every rank calls this (the expert-parallel teacher decodes on all of them); rank 0 returns the
    record, the others None. `tokenizer` is the run's (with the prompt template training used); the
    students are scored on `device`."""
    source = held_out_source(cfg)
    if not cfg.report.eval_examples or source is None:
        return None
    data = load_eval_data(str(resolve_path(source)), format=cfg.data.format, split=cfg.report.eval_split)
    data = EvalData(data.records[: cfg.report.eval_examples], data.format, data.source)
    settings = EvalSettings(greedy=True, max_new_tokens=cfg.report.max_new_tokens,
                            max_prompt_tokens=cfg.data.max_prompt_tokens, batch_size=64, template=cfg.data.template)
    teacher_row = None
    if teacher is not None:
        result = evaluate(teacher.decoding_forward(), tokenizer, data, settings, rank=groups.rank,
                          world_size=groups.world_size, world_group=groups.world_group, progress=False)
        teacher_row = _row(result)
    if groups.rank != 0:
        return None
    after_dir, which = scored_student(final_dir)
    return {
        "data": source,
        "decoding": f"greedy, max_new_tokens={cfg.report.max_new_tokens}",
        "teacher": teacher_row,
        "before": _score_student(before_dir, tokenizer, data, settings, device),
        "after": _score_student(after_dir, tokenizer, data, settings, device),
        "after_student": which,
    }
