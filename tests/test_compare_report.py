"""`ds-moekd report`: collects run folders and eval results, writes report.md and readable plots."""

from __future__ import annotations

import json

import pytest

from ds_moekd.compare import collect, main, steady_tokens_per_s


def eval_result(label: str, eval_set: str, rouge: list[float], gate=None) -> dict:
    per_seed = [{"seed": 10 * (i + 1), "rouge_l": r, "exact_match": r / 2, "exact_match_strict": r / 4}
                for i, r in enumerate(rouge)]
    mean = sum(rouge) / len(rouge)
    std = (sum((r - mean) ** 2 for r in rouge) / len(rouge)) ** 0.5
    result = {
        "counts": {"records": 10, "evaluated": 9, "dropped_long_prompt": 1, "dropped_no_reference": 0,
                   "evaluated_fraction": 0.9},
        "per_seed": per_seed, "rouge_l": {"mean": mean, "std": std},
        "exact_match": {"mean": mean / 2, "std": std / 2}, "exact_match_strict": {"mean": mean / 4, "std": std / 4},
        "settings": {"seeds": [10, 20], "greedy": False, "max_new_tokens": 8, "decoding": "sampling"},
        "model": {"label": label}, "data": {"name": eval_set},
    }
    if gate:
        result["routing_diagnostics"] = {"non_activated_gate_mass": gate}
    return result


def write_run(root, name: str, method: str, step_s: float, validation: bool):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": name, "method": method, "steps": 20, "world_size": 2}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s, "tokens": 100, "step_s": step_s}) + "\n" for s in range(1, 21)))
    if validation:
        (run / "validation.jsonl").write_text("".join(json.dumps(
            {"step": s, "rouge_l": s, "exact_match": s, "exact_match_strict": s / 2, "metric": "rouge_l"}) + "\n"
            for s in (10, 20)))
    (run / "eval" / "demo.json").write_text(json.dumps(eval_result("ignored", "demo", [20.0, 22.0])))
    return run


def test_report_compares_runs_and_systems(tmp_path):
    kd = write_run(tmp_path, "kd", "kd", step_s=0.5, validation=True)
    sft = write_run(tmp_path, "sft", "sft", step_s=0.25, validation=False)
    results = tmp_path / "results"
    results.mkdir()
    (results / "teacher.json").write_text(json.dumps(eval_result("teacher (native)", "demo", [40.0, 44.0],
                                                                 gate=[0.1, 0.3])))
    (results / "teacher_dolly.json").write_text(json.dumps(eval_result("teacher (native)", "dolly", [5.0, 7.0])))
    out = tmp_path / "report"
    main([str(kd), str(sft), str(results), "--out", str(out)])
    inputs = collect([str(kd), str(sft), str(results)])
    assert [label for label, _ in inputs.results] == ["kd", "sft", "teacher (native)", "teacher (native)"]
    assert steady_tokens_per_s(inputs.runs[0]) == pytest.approx(200.0)  # 100 tokens / 0.5 s
    report = (out / "report.md").read_text()
    assert "| teacher (native) | 42.00 ± 2.00 | 6.00 ± 1.00 |" in report  # eval sets sorted: demo, dolly
    assert "| kd | - | 21.00 ± 1.00 |" not in report and "| kd | 21.00 ± 1.00 | - |" in report
    assert "rouge_l 20.00 at step 20" in report and "| sft | sft | 20 | 2 | 400 |" in report
    for png in ("scores_rouge_l.png", "scores_exact_match_strict.png", "loss.png", "throughput.png",
                "validation.png", "gate_mass.png"):
        assert (out / png).stat().st_size > 10_000, png


def test_report_rejects_what_it_cannot_read(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an evaluation result"):
        main([str(tmp_path / "x.json"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
