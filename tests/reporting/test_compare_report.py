"""`ds-moekd report`: collects run folders and eval results, writes report.md and readable plots."""

from __future__ import annotations

import json

import pytest

from ds_moekd.reporting.runs_report import collect, main, steady_tokens_per_s


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


def test_a_folder_of_runs_is_read_run_by_run(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "kd", "kd", step_s=0.5, validation=True)
    write_run(runs, "sft", "sft", step_s=0.25, validation=False)
    inputs = collect([str(runs)])
    assert [r.name for r in inputs.runs] == ["kd", "sft"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run.json, no run folders"):
        collect([str(tmp_path / "empty")])


def test_sets_that_share_a_name_stay_apart_and_a_duplicate_result_is_an_error(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    a = eval_result("teacher", "test", [40.0])
    a["data"]["source"] = "alpaca/test.jsonl"
    b = eval_result("teacher", "test", [10.0])
    b["data"]["source"] = "dolly/test.jsonl"
    (results / "a.json").write_text(json.dumps(a))
    (results / "b.json").write_text(json.dumps(b))
    main([str(results), "--out", str(tmp_path / "out")])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| system | test (alpaca/test.jsonl) | test (dolly/test.jsonl) |" in report
    assert "| teacher | 40.00 (1 run) | 10.00 (1 run) |" in report
    (results / "c.json").write_text(json.dumps(a))
    with pytest.raises(ValueError, match=r"two results for teacher on eval set test \(alpaca/test.jsonl\): .*a.json "
                                         r"and .*c.json"):
        collect([str(results)])


def test_final_loss_is_the_last_tenth_mean_in_both_reports(tmp_path):
    from ds_moekd.reporting.run_report import write_run_report

    run = write_run(tmp_path, "kd", "kd", step_s=0.5, validation=False)
    expected = (3.0 / 19 + 3.0 / 20) / 2  # 20 logged steps: the last tenth is steps 19 and 20
    main([str(run), "--out", str(tmp_path / "out")])
    assert f"| kd | kd | 20 | 2 | 200 | {expected:.4f} |" in (tmp_path / "out" / "report.md").read_text()
    record = {"name": "kd", "method": "kd", "steps": 20, "global_batch_size": 2, "world_size": 2, "zero_stage": 3,
              "teacher_ep_size": 2, "wall_s": 1.0, "per_rank": [], "student_total_params": 1}
    metrics = [{"step": s, "loss": 3.0 / s, "tokens": 100, "step_s": 0.5, "teacher_s": 0.1, "student_s": 0.2,
                "peak_memory_mb": 1.0} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    write_run_report(run, record)
    assert f"final loss (mean over the last tenth of logged steps) {expected:.4f}" in (run / "report.md").read_text()


def test_held_out_scores_a_best_student_only_from_this_run(tmp_path):
    from ds_moekd.reporting.heldout import scored_student

    final = tmp_path / "run" / "student_hf"
    best = tmp_path / "run" / "best_student_hf"
    best.mkdir(parents=True)
    (best / "best.json").write_text(json.dumps({"metric": "rouge_l", "step": 4}))  # left by an earlier run
    (tmp_path / "run" / "validation.jsonl").write_text("")  # this run validated nothing
    assert scored_student(final) == (final, "final")
    (tmp_path / "run" / "validation.jsonl").write_text(json.dumps({"step": 4, "best": True}) + "\n")
    assert scored_student(final) == (best, "best by validation rouge_l (step 4)")
