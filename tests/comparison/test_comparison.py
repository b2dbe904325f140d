"""`ds-moekd compare`: seed statistics against hand computation, scoring and the report in one process,
and a real (tiny) comparison: per seed an SFT init, then two methods from it, each run launched by
`deepspeed` with 2 ranks."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from ds_moekd.comparison.stats import difference, excludes_zero, inside_spread, paired_difference, summarize, t975


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


def test_paired_difference_matches_hand_computation():
    a, b = [30.0, 25.0, 28.0], [27.0, 22.5, 24.5]  # per seed; the seeds move both together
    delta, half = paired_difference(a, b)
    deltas = [3.0, 2.5, 3.5]
    assert delta == pytest.approx(statistics.mean(deltas))
    assert half == pytest.approx(4.303 * statistics.stdev(deltas) / math.sqrt(3))
    assert excludes_zero(delta, half)
    # Welch's unpaired interval of the same numbers is wider: the seed effect is not removed
    assert difference(summarize(a), summarize(b))[1] > half
    assert not excludes_zero(*paired_difference([1.0, -1.0, 0.5], [0.0, 0.0, 0.0]))
    assert paired_difference([2.0], [1.0]) == (1.0, math.inf) and not excludes_zero(1.0, math.inf)
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0, 2.0], [1.0])


def test_teacher_rows_come_from_the_first_method_with_a_teacher():
    from ds_moekd.comparison.cli import teacher_source
    from ds_moekd.config import load_config

    sft, kd = (load_config(REPO / f"ds_configs/methods/{m}.yaml") for m in ("sft", "kd"))
    assert teacher_source([sft, kd]) is kd
    with pytest.raises(ValueError, match="names a teacher.path"):
        teacher_source([sft])


def _method_configs(tiny_demo: Path, directory: Path) -> Path:
    directory.mkdir()
    for label, method in (("kd", "kd"), ("sar", "sar"), ("sft_init", "sft")):
        (directory / f"{label}.yaml").write_text("\n".join([
            f"name: {label}", f"method: {method}", "data:", f"  train_file: {tiny_demo}/data/train.jsonl",
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
               "--eval-seeds", "2", "--out", str(out), "--config-dir", str(configs),
               "--eval-file", f"{tiny_demo}/data/test.jsonl", "--max-new-tokens", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "comparison.json").read_text())
    assert sorted(data["runs"]) == ["kd-seed1", "kd-seed2", "sar-seed1", "sar-seed2"]
    assert sorted(data["inits"]) == ["init-seed1", "init-seed2"]
    for name, run in data["runs"].items():
        assert json.loads((out / "runs" / name / "run.json").read_text())["world_size"] == 2
        assert 0 <= run["scores"]["greedy"]["exact_match"] <= 100 and run["step_s"] > 0
        assert run["scores"]["sampled"]["seeds"] == [1, 2]
        # every method of a seed starts from that seed's SFT init
        init_dir = out / "runs" / f"init-seed{run['seed']}"
        config = (out / "runs" / name / "config.yaml").read_text()
        assert f"path: {init_dir.resolve()}/" in config, config
    assert set(data["teacher"]["routings"]) == {"native", "all", "ka"}
    native = data["teacher"]["routings"]["native"]
    assert native["kl_from_native"] == pytest.approx(0.0, abs=1e-6)
    assert data["teacher"]["routings"]["all"]["kl_from_native"] > 0  # all experts change the distribution
    moved = data["runs"]["sar-seed1"]["router_movement"]
    assert len(moved["router_kl"]) == len(data["teacher"]["gate_mass"]) and min(moved["router_kl"]) > 0
    report = (out / "report.md").read_text()
    for row in ("teacher (native)", "teacher (ka)", "student, base", "student, SFT init", "| kd | 2 |",
                "| sar | 2 |", "Δ vs kd", "KL(native ‖ tuned router)"):
        assert row in report
    assert all((out / png).stat().st_size > 0 for png in ("scores.png", "curves.png"))
    # A second call keeps the finished runs and scores: nothing is trained again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier, kept") == 6


def test_scoring_and_report_in_one_process(tiny_demo, tmp_path):
    """The quick tier's part of the comparison: scoring the teacher's routings and a student (greedy and
    sampled), and the report from those scores (runs stand in for trained ones)."""
    from ds_moekd.comparison.scoring import score_student, score_teacher
    from ds_moekd.data.synthetic import read_jsonl
    from ds_moekd.reporting.comparison_report import write_comparison_report

    records = read_jsonl(tiny_demo / "data/test.jsonl")[:4]
    teacher = score_teacher(tiny_demo / "teacher", records, max_new_tokens=4, resample_prob=0.05, eval_seeds=[1, 2])
    student = score_student(tiny_demo / "student", records, max_new_tokens=4, eval_seeds=[1, 2])
    assert set(teacher["routings"]) == {"native", "all", "ka"}
    assert teacher["routings"]["native"]["kl_from_native"] == pytest.approx(0.0, abs=1e-6)
    assert teacher["routings"]["all"]["kl_from_native"] > 0 and all(0 <= m <= 1 for m in teacher["gate_mass"])
    sampled = student["sampled"]
    assert [run["rouge_l"] for run in sampled["per_seed"]] and sampled["seeds"] == [1, 2]
    assert sampled["rouge_l"] == pytest.approx(statistics.mean(r["rouge_l"] for r in sampled["per_seed"]), abs=1e-3)
    # a sampled evaluation repeats exactly with its seeds
    assert score_student(tiny_demo / "student", records, max_new_tokens=4, eval_seeds=[1, 2])["sampled"] == sampled

    def scores(shift: float) -> dict:
        return {decoding: {**student[decoding], "rouge_l": student[decoding]["rouge_l"] + shift,
                           "exact_match": student[decoding]["exact_match"] + shift} for decoding in student}

    runs, inits = {}, {}
    for seed in (1, 2, 3):
        inits[f"init-seed{seed}"] = {"name": f"init-seed{seed}", "label": "init", "method": "sft", "seed": seed,
                                     "checkpoint": "final", "scores": scores(seed), "step_s": 0.05,
                                     "peak_memory_mb": 90.0}
        for label, gain in (("kd", 1.0), ("gkd", 2.0), ("ka", 5.0 + 0.1 * seed)):
            name = f"{label}-seed{seed}"
            (tmp_path / "runs" / name).mkdir(parents=True)
            (tmp_path / "runs" / name / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 4)))
            runs[name] = {"name": name, "label": label, "method": label, "seed": seed, "checkpoint": "final",
                          "scores": scores(seed + gain), "step_s": 0.1, "peak_memory_mb": 100.0}
    runs["ka-seed1"]["router_movement"] = {"gate_mass_change": [0.01] * len(teacher["gate_mass"]),
                                           "router_kl": [0.002] * len(teacher["gate_mass"])}
    data = {"settings": {"methods": ["kd", "gkd", "ka"], "init": "sft_init", "seeds": [1, 2, 3], "eval_seeds": [1, 2],
                         "world_size": 2, "overrides": [], "eval_file": "test.jsonl", "eval_records": 4,
                         "max_new_tokens": 4, "trained_now_s": {}, "wall_s": 1.0},
            "teacher": teacher, "student_base": student, "inits": inits, "runs": runs}
    report = write_comparison_report(data, tmp_path / "runs", tmp_path).read_text()
    for row in ("teacher (native)", "student, SFT init", "| kd | 3 |", "| ka | 3 |", "KL(native ‖ tuned router)"):
        assert row in report
    # ka is 3.2 above gkd on every seed (+0.1 per seed): the paired interval excludes 0
    ka_vs_gkd = next(line for line in report.splitlines() if line.startswith("| ka | ROUGE-L, sampled |"))
    assert "+3.20 [" in ka_vs_gkd and "excludes 0" in ka_vs_gkd
    assert all((tmp_path / png).stat().st_size > 0 for png in ("scores.png", "curves.png"))


def test_router_distributions_match_transformers_router_logits(tiny_demo):
    """The router distributions SAR's movement is measured with equal softmax(router logits) of
    transformers' own Mixtral forward, token by token (one prompt per forward: no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_moekd.eval.router_mass import router_distributions
    from ds_moekd.teacher import MoETeacher

    tokenizer = AutoTokenizer.from_pretrained(tiny_demo / "teacher")
    prompts = [tokenizer("Add the numbers 3 and 4.", add_special_tokens=False)["input_ids"],
               tokenizer("Sort: pear apple fig", add_special_tokens=False)["input_ids"]]
    ours = router_distributions(MoETeacher.from_pretrained(str(tiny_demo / "teacher")), prompts,
                                tokenizer.pad_token_id, batch_size=2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_demo / "teacher", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [reference(torch.tensor([p]), output_router_logits=True).router_logits for p in prompts]
    for layer, probs_TN in enumerate(ours):
        expected = torch.cat([torch.softmax(per_prompt[layer].float(), dim=-1) for per_prompt in logits])
        torch.testing.assert_close(probs_TN, expected, atol=1e-5, rtol=1e-4)


def test_router_movement_is_zero_for_the_same_routers_and_grows_when_they_move(tiny_demo, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_moekd.comparison.scoring import router_movement
    from ds_moekd.data.synthetic import read_jsonl

    records = read_jsonl(tiny_demo / "data/test.jsonl")[:4]
    same = router_movement(tiny_demo / "teacher", tiny_demo / "teacher", records)
    assert same["router_kl"] == pytest.approx([0.0] * len(same["router_kl"]), abs=1e-9)
    assert same["gate_mass_change"] == pytest.approx([0.0] * len(same["router_kl"]), abs=1e-9)
    moved = AutoModelForCausalLM.from_pretrained(tiny_demo / "teacher", dtype=torch.float32)
    with torch.no_grad():
        moved.model.layers[-1].mlp.gate.weight.mul_(0.1)  # a flatter last-layer router
    moved.save_pretrained(tmp_path / "moved")
    AutoTokenizer.from_pretrained(tiny_demo / "teacher").save_pretrained(tmp_path / "moved")
    result = router_movement(tiny_demo / "teacher", tmp_path / "moved", records)
    assert result["router_kl"][:-1] == pytest.approx([0.0] * (len(result["router_kl"]) - 1), abs=1e-9)
    assert result["router_kl"][-1] > 0 and result["gate_mass_change"][-1] > 0
