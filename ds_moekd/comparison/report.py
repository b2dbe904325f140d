"""`report.md` and its plots for a method comparison (docs/comparison.md): per method the mean ± std
and 95% interval over seeds, the difference from `kd` and whether the seeds can tell them apart,
per-family scores, teacher and undistilled-student rows, cost per step relative to `kd`, loss and
validation curves, and the routers' non-activated gate mass (native and SAR-tuned)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from ds_moekd.atomic import write_text
from ds_moekd.comparison.stats import Summary, difference, inside_spread, summarize
from ds_moekd.telemetry import moving_average, read_metrics

METRICS = {"exact_match": "strict exact match (%)", "rouge_l": "ROUGE-L F1 (x100)"}
BASELINE = "kd"


def by_method(runs: dict) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for run in runs.values():
        grouped[run["method"]].append(run)
    return dict(grouped)


def _interval(s: Summary) -> str:
    if s.n < 2:
        return f"{s.mean:.2f} (1 seed)"
    return f"{s.mean:.2f} ± {s.std:.2f} [{s.mean - s.half_width:.2f}, {s.mean + s.half_width:.2f}]"


def _versus(s: Summary, base: Summary | None) -> str:
    if base is None:
        return "-"
    delta, half = difference(s, base)
    spread = "inside the seed spread" if inside_spread(s, base) else "outside the seed spread"
    return f"{delta:+.2f} ± {half:.2f} ({spread})" if math.isfinite(half) else f"{delta:+.2f} (too few seeds)"


def _relative(value: float, base: float | None) -> str:
    return f"{value / base:.2f}×" if base else "-"


def method_table(data: dict) -> list[str]:
    groups = by_method(data["runs"])
    scores = {m: {k: summarize(r["scores"][k] for r in rs) for k in METRICS} for m, rs in groups.items()}
    cost = {m: (sum(r["step_s"] for r in rs) / len(rs), max(r["peak_memory_mb"] for r in rs)) for m, rs in groups.items()}
    base_scores, base_cost = scores.get(BASELINE), cost.get(BASELINE)
    lines = [f"| system | seeds | {METRICS['exact_match']}: mean ± std [95% CI] | Δ vs {BASELINE} | "
             f"{METRICS['rouge_l']}: mean ± std [95% CI] | s/step | × {BASELINE} | peak MB (rank 0) | × {BASELINE} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in data["teacher"]["routings"].items():
        lines.append(f"| teacher ({name}) | - | {row['exact_match']:.2f} | - | {row['rouge_l']:.2f} | - | - | - | - |")
    before = data["student_before"]
    lines.append(f"| student, undistilled | - | {before['exact_match']:.2f} | - | {before['rouge_l']:.2f} "
                 "| - | - | - | - |")
    for method in groups:
        em, rouge = scores[method]["exact_match"], scores[method]["rouge_l"]
        step_s, memory = cost[method]
        lines.append(f"| {method} | {em.n} | {_interval(em)} | "
                     f"{_versus(em, base_scores['exact_match']) if base_scores and method != BASELINE else '-'} | "
                     f"{_interval(rouge)} | {step_s:.3f} | {_relative(step_s, base_cost and base_cost[0])} | "
                     f"{memory:.0f} | {_relative(memory, base_cost and base_cost[1])} |")
    return lines


def family_table(data: dict) -> list[str]:
    rows = {f"teacher ({n})": r["per_family"] for n, r in data["teacher"]["routings"].items()}
    rows["student, undistilled"] = data["student_before"]["per_family"]
    for method, runs in by_method(data["runs"]).items():
        families = runs[0]["scores"]["per_family"]
        rows[f"{method} (mean of {len(runs)})"] = {
            f: {"exact_match": sum(r["scores"]["per_family"][f]["exact_match"] for r in runs) / len(runs)}
            for f in families}
    families = sorted(next(iter(rows.values())))
    lines = ["| system | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{fam[f]['exact_match']:.1f}" for f in families) + " |"
              for name, fam in rows.items()]
    return lines


def routing_table(data: dict) -> list[str]:
    lines = ["| routing | token NLL (nats) | mean per-token KL from native | strict exact match |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['nll']:.4f} | {r['kl_from_native']:.3g} | {r['exact_match']:.2f} |"
              for name, r in data["teacher"]["routings"].items()]
    return lines


def _sar_gate_mass(data: dict) -> list[float] | None:
    masses = [r["sar_gate_mass"] for r in data["runs"].values() if r.get("sar_gate_mass")]
    return [sum(layer) / len(masses) for layer in zip(*masses)] if masses else None


def plot_scores(data: dict, path: Path) -> None:
    """Per metric: a bar per method (mean, whiskers the 95% interval), teacher and student as lines."""
    groups = by_method(data["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (metric, label) in zip(axes, METRICS.items()):
        summaries = [summarize(r["scores"][metric] for r in groups[m]) for m in groups]
        errors = [s.half_width if math.isfinite(s.half_width) else 0 for s in summaries]
        bars = ax.bar(list(groups), [s.mean for s in summaries], yerr=errors, capsize=4, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        for i, (name, row) in enumerate(data["teacher"]["routings"].items()):
            ax.axhline(row[metric], color=f"C{i + 1}", linestyle="--", linewidth=1, label=f"teacher ({name})")
        ax.axhline(data["student_before"][metric], color="gray", linestyle=":", label="student, undistilled")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: mean over seeds, 95% interval")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(data: dict, runs_dir: Path, path: Path) -> None:
    """Training loss (moving average, mean over seeds) and validation score per method."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (method, runs) in enumerate(by_method(data["runs"]).items()):
        curves = [read_metrics(runs_dir / r["name"] / "metrics.jsonl") for r in runs]
        length = min(len(c) for c in curves)
        mean = [sum(c[j]["loss"] for c in curves) / len(curves) for j in range(length)]
        axes[0].plot([curves[0][j]["step"] for j in range(length)], moving_average(mean, max(1, length // 25)),
                     color=f"C{i}", label=method)
        validations = [runs_dir / r["name"] / "validation.jsonl" for r in runs]
        if all(v.is_file() for v in validations):
            points = [read_metrics(v) for v in validations]
            count = min(len(p) for p in points)
            axes[1].plot([points[0][j]["step"] for j in range(count)],
                         [sum(p[j][p[j]["metric"]] for p in points) / len(points) for j in range(count)],
                         marker="o", color=f"C{i}", label=method)
    axes[0].set(title="Training objective (each method's own loss; mean over seeds)", xlabel="optimizer step",
                ylabel="nats per response token")
    axes[1].set(title="Validation (the runs' selection metric; mean over seeds)", xlabel="optimizer step",
                ylabel="score")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gate_mass(native: list[float], sar: list[float] | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(native)), [100 * m for m in native], marker="o", label="native routers")
    if sar:
        ax.plot(range(len(sar)), [100 * m for m in sar], marker="s", label="SAR-tuned routers (mean over seeds)")
    ax.set(title="Router mass on experts outside the native top-k", xlabel="MoE layer",
           ylabel="non-activated gate mass (%)")
    ax.set_xticks(range(len(native)))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison_report(data: dict, runs_dir: Path, out: Path) -> Path:
    settings = data["settings"]
    plot_scores(data, out / "scores.png")
    plot_curves(data, runs_dir, out / "curves.png")
    sar = _sar_gate_mass(data)
    plot_gate_mass(data["teacher"]["gate_mass"], sar, out / "gate_mass.png")
    lines = [
        "# Method comparison", "",
        f"{len(data['runs'])} runs: methods {', '.join(settings['methods'])} × seeds {settings['seeds']}, "
        f"{settings['world_size']} ranks (teacher expert-parallel, student ZeRO-3), overrides "
        f"`{' '.join(settings['overrides']) or 'none'}`. Scored on `{settings['eval_file']}` "
        f"({settings['eval_records']} records, greedy, {settings['max_new_tokens']} new tokens), the final student "
        "of each run. Intervals: Student-t 95% over seeds; a difference from kd is inside the seed spread when "
        "its Welch 95% interval contains 0.", "",
        *method_table(data), "", "![scores](scores.png)", "",
        "## Per family (strict exact match)", "", *family_table(data), "",
        "## The teacher under each routing", "",
        "Greedy exact match hides soft differences: the token NLL of the reference responses and the mean "
        "per-token KL from the native routing's distribution show what all-expert and KA routing change.", "",
        *routing_table(data), "",
        "## Curves", "", "![curves](curves.png)", "",
        "## Routing diagnostics", "",
        "| routers | " + " | ".join(f"layer {i}" for i in range(len(data["teacher"]["gate_mass"]))) + " |",
        "|---" * (len(data["teacher"]["gate_mass"]) + 1) + "|",
        "| native | " + " | ".join(f"{100 * m:.2f}%" for m in data["teacher"]["gate_mass"]) + " |",
    ]
    if sar:
        lines.append("| SAR-tuned (mean over seeds) | " + " | ".join(f"{100 * m:.2f}%" for m in sar) + " |")
    lines += ["", "![gate mass](gate_mass.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
