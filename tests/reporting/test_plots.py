"""ds_moekd/reporting/plots.py: every figure draws from tiny plain data into a PNG, and importing the module
leaves matplotlib unloaded (every training rank imports the run report; only rank 0 draws)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ds_moekd.reporting import plots

STEPS = [1, 2, 3, 4]
LOSS = [3.0, 2.0, 1.5, 1.2]

FIGURES = {
    "run_loss_curves": lambda p: plots.run_loss_curves(p, STEPS, {"loss": LOSS, "kl": [1.0, 0.8, 0.6, 0.5]}, "kd"),
    "loss_curves_per_run": lambda p: plots.loss_curves_per_run(p, ["kd", "sft"], [(STEPS, LOSS), (STEPS, LOSS)],
                                                               [(STEPS, LOSS), None]),
    "validation_curves": lambda p: plots.validation_curves(p, [("ROUGE-L", {"kd": ([2, 4], [10.0, 12.0])}),
                                                               ("strict EM", {"kd": ([2, 4], [1.0, 2.0])})]),
    "score_bars_per_set": lambda p: plots.score_bars_per_set(
        p, "ROUGE-L", ["teacher", "kd"], {("teacher", "demo"): (40.0, 2.0), ("kd", "demo"): (20.0, 1.0),
                                          ("teacher", "dolly"): (6.0, 1.0)}, ["demo", "dolly"]),
    "throughput_bars": lambda p: plots.throughput_bars(p, ["kd", "run (sft)"], [200.0, 400.0]),
    "gate_mass_per_layer": lambda p: plots.gate_mass_per_layer(p, {"teacher": [0.1, 0.3], "ka": [0.2]}),
    "comparison_score_bars": lambda p: plots.comparison_score_bars(p, [
        plots.ScorePanel("ROUGE-L", {"kd": (20.0, 1.5), "ka": (23.0, float("inf"))}, {"native": 30.0}, 15.0),
        plots.ScorePanel("strict EM", {"kd": (5.0, 0.5), "ka": (6.0, float("inf"))}, {"native": 9.0}, None)]),
    "comparison_curves": lambda p: plots.comparison_curves(p, {"kd": (STEPS, LOSS), "ka": (STEPS, LOSS)},
                                                           {"ka": ([2, 4], [10.0, 11.0])}),
    "e2e_speed_and_memory": lambda p: plots.e2e_speed_and_memory(
        p, ["kd\ndemo", "kd\nrandom-300mb"], {"ours": [100.0, 50.0], "baseline": [90.0, 40.0]},
        {"ours": [500.0, 900.0], "baseline": [600.0, 1000.0]}),
    "e2e_cost_curves": lambda p: plots.e2e_cost_curves(
        p, [0.3, 1.1, 10.1, 0.3, 1.1, 10.1], ["kd"] * 3 + ["ka"] * 3,
        {"ours": [100.0, 50.0, 5.0, 60.0, 30.0, 3.0], "baseline": [90.0, 40.0, None, 50.0, 20.0, None]},
        {"ours": [500.0, 900.0, 6000.0, 520.0, 950.0, 6100.0], "baseline": [600.0, 1300.0, None, 620.0, 1350.0, None]}),
}


@pytest.mark.parametrize("name", FIGURES)
def test_each_figure_writes_a_png(name, tmp_path):
    path = tmp_path / f"{name}.png"
    FIGURES[name](path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_every_public_figure_is_covered():
    drawn = {name for name, f in vars(plots).items()
             if callable(f) and not name.startswith("_") and getattr(f, "__module__", None) == plots.__name__
             and not isinstance(f, type)}
    assert drawn == set(FIGURES)


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_plots_leaves_matplotlib_unloaded():
    code = "import sys, ds_moekd.reporting.plots, ds_moekd.reporting.run_report; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
