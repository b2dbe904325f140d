"""`report.md` and its plots for a method comparison (docs/comparison.md).

Per row (a method config, over its training seeds): sampled and greedy held-out scores as mean ± std
with a Student-t 95% interval, the share of the teacher-init gap it closed, and cost per step. Per
method, the paired difference to `gkd` and to `kd` (the runs of one seed share the student init),
with its 95% interval and whether it excludes 0. Then per-family scores, the teacher under each
routing, training curves, and how far SAR moved the routers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ds_moekd.comparison.stats import Summary, excludes_zero, paired_difference, summarize
from ds_moekd.reporting.plots import ScorePanel, comparison_curves, comparison_score_bars
from ds_moekd.run.atomic import write_text
from ds_moekd.runtime.telemetry import read_metrics

# (decoding, metric, label); the first is the paper's headline number.
SCORES = (("sampled", "rouge_l", "ROUGE-L, sampled"), ("sampled", "exact_match", "strict EM, sampled"),
          ("greedy", "exact_match", "strict EM, greedy"), ("greedy", "rouge_l", "ROUGE-L, greedy"))
PRIMARY = SCORES[0]
BASELINES = ("gkd", "kd")  # KA and SAR are built on GKD, so the paper compares them to it first


def by_label(runs: dict) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for run in runs.values():
        grouped[run["label"]].append(run)
    return {label: sorted(rows, key=lambda r: r["seed"]) for label, rows in grouped.items()}


def value(scores: dict, decoding: str, metric: str) -> float:
    return scores[decoding][metric]


def _summary(rows: list[dict], decoding: str, metric: str) -> Summary:
    return summarize(value(r["scores"], decoding, metric) for r in rows)


def _interval(s: Summary) -> str:
    if s.n < 2:
        return f"{s.mean:.2f} (1 seed)"
    return f"{s.mean:.2f} ± {s.std:.2f} [{s.mean - s.half_width:.2f}, {s.mean + s.half_width:.2f}]"


def gap_closed(run: dict, init: dict | None, teacher: dict, decoding: str, metric: str) -> float | None:
    """(student - its init) / (teacher's native routing - its init): 1 = caught up with the teacher."""
    if init is None:
        return None
    start = value(init["scores"], decoding, metric)
    gap = value(teacher["routings"]["native"], decoding, metric) - start
    return (value(run["scores"], decoding, metric) - start) / gap if gap > 0 else None


def _init_of(data: dict, seed: int) -> dict | None:
    return data["inits"].get(f"init-seed{seed}")


def score_table(data: dict) -> list[str]:
    groups = by_label(data["runs"])
    cost = {label: (sum(r["step_s"] for r in rows) / len(rows), max(r["peak_memory_mb"] for r in rows))
            for label, rows in groups.items()}
    base = cost.get("kd")
    head = " | ".join(label for _, _, label in SCORES)
    lines = [f"| system | seeds | checkpoint | {head} | gap closed ({PRIMARY[2]}) | s/step | × kd | peak MB | × kd |",
             "|---" * (8 + len(SCORES)) + "|"]
    blank = " | ".join("-" for _ in range(4))
    for name, row in data["teacher"]["routings"].items():
        cells = " | ".join(f"{value(row, d, m):.2f}" for d, m, _ in SCORES)
        lines.append(f"| teacher ({name}) | - | - | {cells} | - | {blank} |")
    cells = " | ".join(f"{value(data['student_base'], d, m):.2f}" for d, m, _ in SCORES)
    lines.append(f"| student, base (before SFT) | - | - | {cells} | - | {blank} |")
    rows_by_label = ({"student, SFT init": list(data["inits"].values())} if data["inits"] else {}) | groups
    for label, rows in rows_by_label.items():
        cells = " | ".join(_interval(_summary(rows, d, m)) for d, m, _ in SCORES)
        closed = [gap_closed(r, _init_of(data, r["seed"]), data["teacher"], *PRIMARY[:2]) for r in rows]
        closed = [c for c in closed if c is not None]
        closed_text = f"{100 * sum(closed) / len(closed):.0f}%" if closed and label in groups else "-"
        step_s, memory = (sum(r["step_s"] for r in rows) / len(rows), max(r["peak_memory_mb"] for r in rows))
        relative = (f"{step_s / base[0]:.2f}×", f"{memory / base[1]:.2f}×") if base else ("-", "-")
        lines.append(f"| {label} | {len(rows)} | {rows[0]['checkpoint'].split(' (')[0]} | {cells} | {closed_text} "
                     f"| {step_s:.3f} | {relative[0]} | {memory:.0f} | {relative[1]} |")
    return lines


def paired_table(data: dict) -> list[str]:
    """Per row and score: the paired difference to each baseline over the seeds both have."""
    groups = by_label(data["runs"])
    present = [b for b in BASELINES if b in groups]
    lines = ["| system | score | " + " | ".join(f"Δ vs {b} [95%]" for b in present) + " |",
             "|---|---" + "|---" * len(present) + "|"]
    for label, rows in groups.items():
        for decoding, metric, name in SCORES[:3]:
            cells = []
            for baseline in present:
                if label == baseline:
                    cells.append("-")
                    continue
                base = {r["seed"]: r for r in groups[baseline]}
                pairs = [(r, base[r["seed"]]) for r in rows if r["seed"] in base]
                delta, half = paired_difference([value(a["scores"], decoding, metric) for a, _ in pairs],
                                                [value(b["scores"], decoding, metric) for _, b in pairs])
                if not math.isfinite(half):
                    cells.append(f"{delta:+.2f} (1 seed: no interval)")
                    continue
                verdict = "excludes 0" if excludes_zero(delta, half) else "contains 0"
                cells.append(f"{delta:+.2f} [{delta - half:+.2f}, {delta + half:+.2f}] {verdict}")
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return lines


def family_table(data: dict) -> list[str]:
    decoding = PRIMARY[0]
    rows = {f"teacher ({n})": r[decoding]["per_family"] for n, r in data["teacher"]["routings"].items()}
    rows["student, base"] = data["student_base"][decoding]["per_family"]
    groups = ({"student, SFT init": list(data["inits"].values())} if data["inits"] else {}) | by_label(data["runs"])
    for label, runs in groups.items():
        families = runs[0]["scores"][decoding]["per_family"]
        rows[f"{label} (mean of {len(runs)})"] = {
            f: {"exact_match": sum(r["scores"][decoding]["per_family"][f]["exact_match"] for r in runs) / len(runs)}
            for f in families}
    families = sorted(next(iter(rows.values())))
    lines = ["| system | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{fam[f]['exact_match']:.1f}" for f in families) + " |"
              for name, fam in rows.items()]
    return lines


def routing_table(data: dict) -> list[str]:
    lines = ["| routing | token NLL (nats) | mean per-token KL from native | ROUGE-L, sampled | strict EM, greedy |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['nll']:.4f} | {r['kl_from_native']:.3g} | {value(r, 'sampled', 'rouge_l'):.2f} "
              f"| {value(r, 'greedy', 'exact_match'):.2f} |" for name, r in data["teacher"]["routings"].items()]
    return lines


def router_table(data: dict) -> list[str]:
    """Per SAR row, per MoE layer: gate mass outside the native top-k before → after, and KL(native ‖ SAR)."""
    native = data["teacher"]["gate_mass"]
    lines = ["| routers | " + " | ".join(f"layer {i}" for i in range(len(native))) + " |",
             "|---" * (len(native) + 1) + "|",
             "| native: mass outside top-k | " + " | ".join(f"{100 * m:.2f}%" for m in native) + " |"]
    for label, rows in by_label(data["runs"]).items():
        moved = [r["router_movement"] for r in rows if r.get("router_movement")]
        if not moved:
            continue
        change = [sum(layer) / len(moved) for layer in zip(*(m["gate_mass_change"] for m in moved))]
        kl = [sum(layer) / len(moved) for layer in zip(*(m["router_kl"] for m in moved))]
        lines.append(f"| {label}: change of that mass (mean of {len(moved)}) | "
                     + " | ".join(f"{100 * c:+.3f} pt" for c in change) + " |")
        lines.append(f"| {label}: KL(native ‖ tuned router) | " + " | ".join(f"{k:.2e}" for k in kl) + " |")
    return lines


def score_panels(data: dict) -> list[ScorePanel]:
    """The plotted scores (the headline and strict EM, greedy): per row its mean and 95% interval."""
    groups = by_label(data["runs"])
    panels = []
    for decoding, metric, label in (PRIMARY, SCORES[2]):
        summaries = {g: _summary(rows, decoding, metric) for g, rows in groups.items()}
        teacher = {name: value(row, decoding, metric) for name, row in data["teacher"]["routings"].items()}
        init = _summary(list(data["inits"].values()), decoding, metric).mean if data["inits"] else None
        panels.append(ScorePanel(label, {g: (s.mean, s.half_width) for g, s in summaries.items()}, teacher, init))
    return panels


def mean_curves(data: dict, runs_dir: Path) -> tuple[dict, dict]:
    """Per row, its training loss and validation score per step, each the mean over its seeds (over
    the steps all seeds logged); validation only for rows whose every seed validated."""
    loss, validation = {}, {}
    for label, runs in by_label(data["runs"]).items():
        curves = [read_metrics(runs_dir / r["name"] / "metrics.jsonl") for r in runs]
        length = min(len(c) for c in curves)
        loss[label] = ([curves[0][j]["step"] for j in range(length)],
                       [sum(c[j]["loss"] for c in curves) / len(curves) for j in range(length)])
        validations = [runs_dir / r["name"] / "validation.jsonl" for r in runs]
        if all(v.is_file() for v in validations):
            points = [read_metrics(v) for v in validations]
            count = min(len(p) for p in points)
            validation[label] = ([points[0][j]["step"] for j in range(count)],
                                 [sum(p[j][p[j]["metric"]] for p in points) / len(points) for j in range(count)])
    return loss, validation


def write_comparison_report(data: dict, runs_dir: Path, out: Path) -> Path:
    settings = data["settings"]
    comparison_score_bars(out / "scores.png", score_panels(data))
    comparison_curves(out / "curves.png", *mean_curves(data, runs_dir))
    init = (f"each seed's student first fine-tuned by `{settings['init']}` (stage 0), every method starting "
            "from that seed's init" if data["inits"] else "every method from its config's own student")
    lines = [
        "# Method comparison", "",
        f"{len(data['runs'])} runs: {', '.join(settings['methods'])} × training seeds {settings['seeds']}, "
        f"{init}; {settings['world_size']} ranks (teacher expert-parallel, student ZeRO-3), overrides "
        f"`{' '.join(settings['overrides']) or 'none'}`. Scored on `{settings['eval_file']}` "
        f"({settings['eval_records']} records, up to {settings['max_new_tokens']} new tokens): greedy, and sampled at "
        f"temperature 1 with evaluation seeds {settings['eval_seeds']} (their mean per student). Mean ± std "
        "over training seeds [Student-t 95% interval]. The checkpoint column says which student each "
        "config scores (final, or the best on the validation split).", "",
        *score_table(data), "", "![scores](scores.png)", "",
        "## Paired differences", "",
        "Per seed, the row's score minus the baseline's (same init, same data order); mean over seeds "
        "[95% interval, Student t with seeds − 1 degrees of freedom]. *Excludes 0*: those seeds tell the two "
        "apart.", "", *paired_table(data), "",
        f"## Per family ({PRIMARY[0]} strict exact match)", "", *family_table(data), "",
        "## The teacher under each routing", "",
        "Decoded scores hide soft differences: the token NLL of the reference responses and the mean "
        "per-token KL from the native routing's distribution show what all-expert and KA routing change.", "",
        *routing_table(data), "",
        "## Routers", "", *router_table(data), "",
        "## Curves", "", "![curves](curves.png)", "",
        f"Wall time of this call: {settings['wall_s'] / 60:.1f} min "
        f"({len(settings['trained_now_s'])} runs trained by it; the others were already in the output folder).", "",
    ]
    write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
