"""A run's `report.md`: what ran, the loss curve, throughput, and the student before/after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.assets import resolve_path
from ds_moekd.atomic import write_text
from ds_moekd.config import RunConfig
from ds_moekd.data.formats import EvalData, load_eval_data
from ds_moekd.eval.runner import EvalSettings, evaluate
from ds_moekd.telemetry import moving_average, read_metrics


def score_model(model_dir: Path, data: EvalData, max_new_tokens: int, max_prompt_tokens: int,
                device: torch.device | str = "cpu") -> dict:
    """Greedy decoding on held-out records through the eval pipeline: strict exact match, ROUGE-L."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=str(device)).eval()
    settings = EvalSettings(greedy=True, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                            batch_size=64)
    result = evaluate(model, tokenizer, data, settings, progress=False)
    return {
        "examples": result["counts"]["evaluated"],
        "exact_match": result["exact_match_strict"]["mean"],
        "rouge_l": result["rouge_l"]["mean"],
    }


def evaluate_student(cfg: RunConfig, before_dir: Path, after_dir: Path, device: torch.device | str = "cpu") -> dict:
    eval_file = cfg.report.eval_file or cfg.data.valid_file
    data = load_eval_data(str(resolve_path(eval_file)), format=cfg.data.format)
    data = EvalData(data.records[: cfg.report.eval_examples], data.format, data.source)
    args = (data, cfg.report.max_new_tokens, cfg.data.max_prompt_tokens, device)
    return {
        "data": eval_file,
        "decoding": f"greedy, max_new_tokens={cfg.report.max_new_tokens}",
        "before": score_model(before_dir, *args),
        "after": score_model(after_dir, *args),
    }


def plot_loss(metrics: list[dict], path: Path, title: str) -> None:
    """Per-step losses (faint) with a moving average (solid): single steps are noisy."""
    steps = [m["step"] for m in metrics]
    window = max(1, len(metrics) // 25)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in (("loss", "C0"), ("ce", "C1"), ("kl", "C2")):
        if key in metrics[0]:
            values = [m[key] for m in metrics]
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color=color, label=f"{key} ({window}-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tenth_means(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def write_run_report(run_dir: Path, record: dict) -> None:
    metrics = read_metrics(run_dir / "metrics.jsonl")
    plot_loss(metrics, run_dir / "loss.png", f"{record['name']}: {record['method']} training loss")
    first, last = _tenth_means([m["loss"] for m in metrics])
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
        f"Mean loss over the first tenth of steps {first:.4f}, over the last tenth {last:.4f}.",
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
        ev = record["eval"]
        lines += [
            "",
            f"## Student on held-out data ({ev['before']['examples']} examples of `{ev['data']}`, {ev['decoding']})",
            "",
            "| student | strict exact match | ROUGE-L |",
            "|---|---|---|",
            f"| before | {ev['before']['exact_match']:.2f} | {ev['before']['rouge_l']:.2f} |",
            f"| after {record['method']} | {ev['after']['exact_match']:.2f} | {ev['after']['rouge_l']:.2f} |",
        ]
    if (run_dir / "sar_teacher_hf").is_dir():
        lines += ["", "The SAR-tuned teacher (only its router tensors changed) is in `sar_teacher_hf/`."]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
