"""Every figure ds-moekd draws, from plain numbers and labels: a run's loss (report.md of a run),
the `ds-moekd report` and `ds-moekd compare` plots, and the `ds-moekd bench e2e` plot.

matplotlib is imported on the first plot, not with this module: every training rank imports the
run report, and only rank 0 draws, once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

Curve = tuple[list[float], list[float]]  # (optimizer steps, values)
LOSS_TERM_COLORS = {"loss": "C0", "ce": "C1", "kl": "C2"}  # a loss term keeps its colour whatever else a method logs


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (shorter at the start), for readable loss curves."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label_axes(ax, title: str, xlabel: str, ylabel: str, legend_fontsize: float | None = 8) -> None:
    """Title, axis labels, grid, and a legend of whatever was drawn with a label (a run may lack a curve)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_fontsize)


def _save(fig, path: Path, dpi: int = 110, **tight_layout) -> None:
    fig.tight_layout(**tight_layout)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)


def _noisy_curve(ax, curve: Curve, color: str, label: str) -> None:
    """Raw steps faint, a trailing mean over a 25th of them solid: single steps are noisy.
    `label` may name the window as `{window}`."""
    steps, values = curve
    window = max(1, len(values) // 25)
    ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
    ax.plot(steps, _moving_average(list(values), window), color=color, label=label.format(window=window))


def run_loss_curves(path: Path, steps: list[float], terms: dict[str, list[float]], title: str) -> None:
    """One run's loss terms (`loss`, and `ce`/`kl` where the method logs them) per optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, values in terms.items():
        _noisy_curve(ax, (steps, values), LOSS_TERM_COLORS[key], f"{key} ({{window}}-step mean)")
    _label_axes(ax, title, "optimizer step", "loss (nats per response token)", legend_fontsize=None)
    _save(fig, path)


def loss_curves_per_run(path: Path, runs: list[str], objective: list[Curve | None], ce: list[Curve | None]) -> None:
    """Two panels, a curve per run (colour fixed per run): the training objective, which differs by
    method, and cross-entropy on dataset responses; None where a run did not log it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, curves, title in ((axes[0], objective, "Training objective (method's own loss)"),
                              (axes[1], ce, "Cross-entropy on dataset responses")):
        for i, (run, curve) in enumerate(zip(runs, curves, strict=True)):
            if curve:
                _noisy_curve(ax, curve, f"C{i}", f"{run}, {{window}}-step mean")
        _label_axes(ax, title, "optimizer step", "nats per response token")
    _save(fig, path)


def validation_curves(path: Path, panels: list[tuple[str, dict[str, Curve]]]) -> None:
    """A panel per validation score (its name titles the panel and its axis), a marked curve per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for ax, (score, curves) in zip(axes, panels):
        for run, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o", label=run)
        _label_axes(ax, f"Validation {score}", "optimizer step", score)
    _save(fig, path)


def score_bars_per_set(path: Path, score: str, systems: list[str],
                       cells: dict[tuple[str, str], tuple[float, float]], sets: list[str]) -> None:
    """A panel per eval set (own y scale), a bar per system with a (mean, std over seeds) cell there;
    colours fixed per system, one legend for all panels."""
    plt = _pyplot()
    colors = {system: plt.cm.tab10(i % 10) for i, system in enumerate(systems)}
    ncols = min(3, len(sets))
    nrows = -(-len(sets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0, 4.6 * ncols), 3.6 * nrows + 0.4 * len(systems) / ncols + 0.8),
                             squeeze=False)
    for ax, eval_set in zip(axes.flat, sets):
        present = [s for s in systems if (s, eval_set) in cells]
        means, stds = zip(*(cells[(s, eval_set)] for s in present))
        bars = ax.bar(range(len(present)), means, yerr=stds, capsize=3, color=[colors[s] for s in present])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_xticks([])
        ax.set_title(eval_set)
        ax.set_ylabel(score)
        ax.set_ylim(0, max([m + s for m, s in zip(means, stds)] + [1e-3]) * 1.2)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(sets):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in systems]
    fig.legend(handles, systems, loc="lower center", ncol=min(3, len(systems)), fontsize=8)
    fig.suptitle(f"{score} per evaluation set\n(bars: mean, whiskers: std over seeds)")
    _save(fig, path, rect=(0, 0.04 + 0.035 * -(-len(systems) // 3), 1, 1))


def throughput_bars(path: Path, runs: list[str], tokens_per_s: list[float]) -> None:
    """A bar per run of its tokens/s over all ranks after warm-up; `name (method)` labels wrap before `(`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(runs)), 4))
    ax.bar([run.replace(" (", "\n(") for run in runs], tokens_per_s, color="tab:green")
    _label_axes(ax, "Training throughput per run (after warm-up)", "run (method)", "tokens per second (all ranks)")
    _save(fig, path)


def gate_mass_per_layer(path: Path, gate_mass: dict[str, list[float]]) -> None:
    """Per system, the teacher's router probability (a fraction) outside the native top-k, per MoE layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, mass in gate_mass.items():
        ax.plot(range(len(mass)), [100 * m for m in mass], marker="o", label=label)
    ax.set_xticks(range(max(len(m) for m in gate_mass.values())))
    ax.set_ylim(bottom=0)
    _label_axes(ax, "Teacher router mass on experts outside the native top-k", "MoE layer index",
                "non-activated gate mass (% of router probability)")
    _save(fig, path)


class ScorePanel(NamedTuple):
    """One score of a method comparison: per row (mean over seeds, 95% interval half-width, inf for
    one seed), and the lines to compare against."""

    score: str
    rows: dict[str, tuple[float, float]]
    teacher: dict[str, float]  # routing name -> the teacher's score under it
    init: float | None  # the SFT init's mean, where methods start from one


def comparison_score_bars(path: Path, panels: list[ScorePanel]) -> None:
    """A panel per score: a bar per row (whiskers the 95% interval, none for one seed), the teacher
    under each routing as dashed lines and the SFT init as a dotted one."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.2))
    for ax, panel in zip(axes, panels):
        means, halves = zip(*panel.rows.values())
        bars = ax.bar(list(panel.rows), means, yerr=[h if math.isfinite(h) else 0 for h in halves], capsize=4,
                      color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        for i, (routing, score) in enumerate(panel.teacher.items()):
            ax.axhline(score, color=f"C{i + 1}", linestyle="--", linewidth=1, label=f"teacher ({routing})")
        if panel.init is not None:
            ax.axhline(panel.init, color="gray", linestyle=":", label="student, SFT init")
        ax.set_ylabel(panel.score)
        ax.set_title(f"{panel.score}: mean over seeds, 95% interval")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    _save(fig, path)


def comparison_curves(path: Path, loss: dict[str, Curve], validation: dict[str, Curve]) -> None:
    """Per row (colour fixed by its place in `loss`), its training loss as a trailing mean over a 25th
    of the steps, and its validation score, both already averaged over seeds; rows without
    validation get no right-hand curve."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (row, (steps, values)) in enumerate(loss.items()):
        axes[0].plot(steps, _moving_average(values, max(1, len(values) // 25)), color=f"C{i}", label=row)
        if row in validation:
            axes[1].plot(*validation[row], marker="o", color=f"C{i}", label=row)
    _label_axes(axes[0], "Training objective (each method's own loss; mean over seeds)", "optimizer step",
                "nats per response token")
    _label_axes(axes[1], "Validation split (greedy; mean over seeds)", "optimizer step", "score")
    _save(fig, path)


def e2e_cost_curves(path: Path, teacher_gb: list[float], methods: list[str], tokens_per_s: dict[str, list],
                    peak_mib_per_rank: dict[str, list]) -> None:
    """Tokens/s and peak memory per rank against the teacher's size, a line per (method, system);
    a system with no value at a size (the baseline out of memory) is marked with an x at the bottom."""
    plt = _pyplot()
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, values in ((ax_speed, tokens_per_s), (ax_mem, peak_mib_per_rank)):
        for method in dict.fromkeys(methods):
            rows = [i for i, m in enumerate(methods) if m == method]
            for system, style in zip(values, ("-o", "--s"), strict=False):
                done = [i for i in rows if values[system][i] is not None]
                line, = ax.plot([teacher_gb[i] for i in done], [values[system][i] for i in done], style,
                                label=f"{method} {system}")
                failed = [teacher_gb[i] for i in rows if values[system][i] is None]
                if failed:
                    ax.plot(failed, [0] * len(failed), "x", color=line.get_color(), markersize=10)
        ax.set_xscale("log")
        ax.set_xlabel("teacher size (GB, fp32)")
    ax_speed.set_title("tokens/s (x: out of memory)")
    ax_mem.set_title("peak memory per rank (MiB)")
    ax_mem.legend(fontsize=7)
    _save(fig, path, dpi=120)


def e2e_speed_and_memory(path: Path, cases: list[str], tokens_per_s: dict[str, list[float]],
                         peak_mib_per_rank: dict[str, list[float]]) -> None:
    """Side by side per case (method and size), a bar per system (ours, baseline): median tokens/s
    and peak memory per rank."""
    plt = _pyplot()
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = range(len(cases))
    for ax, values in ((ax_speed, tokens_per_s), (ax_mem, peak_mib_per_rank)):
        for offset, (system, heights) in zip((-0.2, 0.2), values.items(), strict=True):
            ax.bar([i + offset for i in x], heights, 0.4, label=system)
    for ax, title in ((ax_speed, "tokens/s (median of runs)"), (ax_mem, "peak memory per rank (MiB)")):
        ax.set_xticks(list(x), cases)
        ax.set_title(title)
        ax.legend()
    _save(fig, path, dpi=120)
