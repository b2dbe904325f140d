"""`ds-moekd compare`: seed statistics against hand computation, and a real (tiny) comparison of two
methods over two seeds, each run launched by `deepspeed` with 2 ranks."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ds_moekd.comparison.stats import difference, inside_spread, summarize, t975

REPO = Path(__file__).resolve().parents[1]


def test_summary_matches_hand_computation():
    s = summarize([10.0, 12.0, 17.0])
    assert s.mean == pytest.approx(13.0)
    assert s.std == pytest.approx(statistics.stdev([10, 12, 17]))
    assert s.half_width == pytest.approx(4.303 * s.std / math.sqrt(3))  # t_{0.975}(2)
    assert summarize([5.0]).half_width == math.inf  # one seed: no interval


def test_welch_difference_and_the_seed_spread():
    a, b = summarize([50.0, 52.0, 51.0]), summarize([40.0, 41.0, 39.0])
    delta, half = difference(a, b)
    va, vb = a.std**2 / 3, b.std**2 / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert delta == pytest.approx(11.0)
    assert half == pytest.approx(t975(df) * math.sqrt(va + vb))
    assert not inside_spread(a, b)
    assert inside_spread(summarize([50.0, 60.0, 40.0]), summarize([52.0, 45.0, 58.0]))
    assert t975(2.7) == 4.303 and t975(100) == 1.96


def test_teacher_rows_come_from_the_first_method_with_a_teacher():
    from ds_moekd.comparison.cli import teacher_source
    from ds_moekd.config import load_config

    sft, kd = (load_config(REPO / f"ds_configs/methods/{m}.yaml") for m in ("sft", "kd"))
    assert teacher_source([sft, kd]) is kd
    with pytest.raises(ValueError, match="names a teacher.path"):
        teacher_source([sft])


def _method_configs(tiny_demo: Path, directory: Path) -> Path:
    directory.mkdir()
    for method in ("kd", "sar"):
        (directory / f"{method}.yaml").write_text("\n".join([
            f"name: {method}", f"method: {method}", "data:", f"  train_file: {tiny_demo}/data/train.jsonl",
            f"  valid_file: {tiny_demo}/data/valid.jsonl", "  micro_batch_size: 3", "teacher:",
            f"  path: {tiny_demo}/teacher", "  ep_size: 2", "student:", f"  path: {tiny_demo}/student",
            "train:", "  steps: 3", "report:", "  eval_examples: 4", "  max_new_tokens: 4", "validation:",
            "  every: 3", "  examples: 4", "  max_new_tokens: 4", "gkd:", "  max_new_tokens: 4",
            "sar:", "  router_lr: 1.0e-3", "",
        ]))
    return directory


@pytest.mark.slow
def test_compare_trains_scores_and_reports(tiny_demo, tmp_path):
    configs = _method_configs(tiny_demo, tmp_path / "configs")
    out = tmp_path / "compare"
    command = [sys.executable, "-m", "ds_moekd.cli", "compare", "--methods", "kd", "sar", "--seeds", "2",
               "--out", str(out), "--config-dir", str(configs), "--eval-file", f"{tiny_demo}/data/test.jsonl",
               "--max-new-tokens", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "comparison.json").read_text())
    assert sorted(data["runs"]) == ["kd-seed1", "kd-seed2", "sar-seed1", "sar-seed2"]
    for name, run in data["runs"].items():
        assert json.loads((out / "runs" / name / "run.json").read_text())["world_size"] == 2
        assert 0 <= run["scores"]["exact_match"] <= 100 and run["step_s"] > 0
    assert set(data["teacher"]["routings"]) == {"native", "all", "ka"}
    native = data["teacher"]["routings"]["native"]
    assert native["kl_from_native"] == pytest.approx(0.0, abs=1e-6)
    assert data["teacher"]["routings"]["all"]["kl_from_native"] > 0  # all experts change the distribution
    assert len(data["runs"]["sar-seed1"]["sar_gate_mass"]) == len(data["teacher"]["gate_mass"])
    report = (out / "report.md").read_text()
    for row in ("teacher (native)", "teacher (ka)", "student, undistilled", "| kd | 2 |", "| sar | 2 |",
                "Δ vs kd", "SAR-tuned"):
        assert row in report
    assert all((out / png).stat().st_size > 0 for png in ("scores.png", "curves.png", "gate_mass.png"))
    # A second call keeps the finished runs and scores: nothing is trained again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier, kept") == 4


def test_scoring_and_report_in_one_process(tiny_demo, tmp_path):
    """The quick tier's part of the comparison: scoring the teacher's routings and a student, and the
    report from those scores (runs stand in for trained ones: the undistilled student, 2 seeds)."""
    from ds_moekd.comparison.report import write_comparison_report
    from ds_moekd.comparison.scoring import score_student, score_teacher
    from ds_moekd.data.synthetic import read_jsonl

    records = read_jsonl(tiny_demo / "data/test.jsonl")[:4]
    teacher = score_teacher(tiny_demo / "teacher", records, max_new_tokens=4, resample_prob=0.05)
    student = score_student(tiny_demo / "student", records, max_new_tokens=4)
    assert set(teacher["routings"]) == {"native", "all", "ka"}
    assert teacher["routings"]["native"]["kl_from_native"] == pytest.approx(0.0, abs=1e-6)
    assert teacher["routings"]["all"]["kl_from_native"] > 0 and all(0 <= m <= 1 for m in teacher["gate_mass"])
    assert 0 <= student["exact_match"] <= 100
    runs = {}
    for method in ("kd", "sar"):
        for seed in (1, 2):
            name = f"{method}-seed{seed}"
            (tmp_path / "runs" / name).mkdir(parents=True)
            (tmp_path / "runs" / name / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 4)))
            runs[name] = {"name": name, "method": method, "seed": seed, "scores": student, "step_s": 0.1,
                          "peak_memory_mb": 100.0}
    runs["sar-seed1"]["sar_gate_mass"] = teacher["gate_mass"]
    data = {"settings": {"methods": ["kd", "sar"], "seeds": [1, 2], "world_size": 2, "overrides": [],
                         "eval_file": "test.jsonl", "eval_records": 4, "max_new_tokens": 4, "trained_now_s": 0},
            "teacher": teacher, "student_before": student, "runs": runs}
    report = write_comparison_report(data, tmp_path / "runs", tmp_path).read_text()
    for row in ("teacher (native)", "| kd | 2 |", "| sar | 2 |", "SAR-tuned"):
        assert row in report
    assert all((tmp_path / png).stat().st_size > 0 for png in ("scores.png", "curves.png", "gate_mass.png"))
