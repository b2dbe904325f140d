"""A run's `report.md`: what ran, the loss curve, throughput, and the student before/after."""

from __future__ import annotations

from pathlib import Path

from ds_moekd.methods import METHODS
from ds_moekd.methods.sar import EXPORT_DIR as TUNED_TEACHER_DIR
from ds_moekd.reporting.plots import LOSS_TERM_COLORS, run_loss_curves
from ds_moekd.run.atomic import write_text
from ds_moekd.runtime.telemetry import FINAL_LOSS, final_loss, read_metrics, tenth


def write_run_report(run_dir: Path, record: dict) -> None:
    metrics = read_metrics(run_dir / "metrics.jsonl")
    run_loss_curves(run_dir / "loss.png", [m["step"] for m in metrics],
                    {key: [m[key] for m in metrics] for key in LOSS_TERM_COLORS if key in metrics[0]},
                    f"{record['name']}: {record['method']} training loss")
    first = sum(m["loss"] for m in metrics[: tenth(metrics)]) / tenth(metrics)
    steady = metrics[len(metrics) // 10 :] or metrics  # skip warm-up steps for throughput
    tokens_per_s = sum(m["tokens"] for m in steady) / sum(m["step_s"] for m in steady)
    lines = [
        f"# Run `{record['name']}`",
        "",
        f"Method **{record['method']}**, {record['steps']} steps, global batch {record['global_batch_size']}, "
        f"world size {record['world_size']}, ZeRO stage {record['zero_stage']}, "
        f"teacher expert-parallel size {record['teacher_ep_size']}. Wall time {record['wall_s']:.0f} s.",
        "",
        "## Loss",
        "",
        f"Mean loss over the first tenth of logged steps {first:.4f}; {FINAL_LOSS} {final_loss(metrics):.4f}.",
        "",
        "![loss](loss.png)",
        "",
        "## Throughput and memory",
        "",
        f"- {tokens_per_s:.0f} tokens/s (all ranks, after the first tenth of steps)",
        f"- teacher forward {sum(m['teacher_s'] for m in steady) / len(steady) * 1000:.1f} ms/step, "
        f"student {sum(m['student_s'] for m in steady) / len(steady) * 1000:.1f} ms/step",
        *(f"- {label} {sum(m[key] for m in steady) / len(steady) * 1000:.1f} ms/step"
          for key, label in (("rollout_s", "student rollouts"), ("router_s", "SAR router step"))
          if key in steady[0]),
        f"- peak memory (rank 0) {max(m['peak_memory_mb'] for m in metrics):.0f} MB",
        "",
        "## Parallel layout (read from the live engine and teacher)",
        "",
        "| rank | student params held (ZeRO-3 partition) | teacher experts held | teacher expert bytes |",
        "|---|---|---|---|",
    ]
    for r in record["per_rank"]:
        t = r["teacher"] or {}
        lines.append(
            f"| {r['rank']} | {r['student_partitioned_params']:,} of {record['student_total_params']:,} | "
            f"{t.get('local_expert_ids', '-')} | {t.get('expert_param_bytes', '-')} |"
        )
    validation_path = run_dir / "validation.jsonl"
    if validation_path.exists() and validation_path.read_text().strip():
        scores = read_metrics(validation_path)
        lines += [
            "",
            f"## Validation during training ({scores[0]['evaluated']} examples, {scores[0]['decoding']}; "
            f"best by {scores[0]['metric']} kept in `best_student_hf/`)",
            "",
            "| step | strict exact match | exact match | ROUGE-L | best so far |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['step']} | {r['exact_match_strict']:.2f} | {r['exact_match']:.2f} | {r['rouge_l']:.2f} | "
            f"{'yes' if r['best'] else ''} |"
            for r in scores
        ]
    if "eval" in record:
        lines += _held_out_lines(record["eval"], record["method"])
    if (run_dir / TUNED_TEACHER_DIR).is_dir():
        lines += ["", "The SAR-tuned teacher (only its router tensors changed) is in `" + TUNED_TEACHER_DIR + "/`."]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def _held_out_lines(ev: dict, method: str) -> list[str]:
    """Teacher, undistilled and distilled student on the held-out set (ds_moekd/reporting/heldout.py)."""
    tuned = getattr(METHODS.get(method), "trains_teacher_routers", False)
    teacher = f"teacher (routers as {method.upper()} trained them)" if tuned else "teacher"
    rows = [(teacher, ev["teacher"]), ("student before distillation", ev["before"]),
            (f"student after {method}, {ev['after_student']}", ev["after"])]
    return [
        "",
        f"## Held-out data ({ev['before']['examples']} examples of `{ev['data']}`, {ev['decoding']}; "
        "not the set validation chose the checkpoint on)",
        "",
        "| system | strict exact match | ROUGE-L |",
        "|---|---|---|",
        *(f"| {name} | {row['exact_match']:.2f} | {row['rouge_l']:.2f} |" for name, row in rows if row is not None),
    ]
