"""The whole training job on 2 real ranks: EP-2 teacher, ZeRO-3 student, run folder contents."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.training_runs import REPO, STEPS, e2e_overrides, train_on_rank
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.config import load_config
from ds_moekd.runtime.telemetry import read_metrics


@pytest.fixture(scope="module")
def kd_run(rank_pool2, tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    written = rank_pool2.run(train_on_rank, REPO / "ds_configs/methods/kd.yaml", e2e_overrides(tiny_demo, out),
                             timeout_s=600)
    assert written == [True, False]  # rank 0 writes the record, rank 1 returns None
    return out / "e2e"


def test_run_json_reads_the_parallel_layout_from_live_objects(kd_run):
    run = json.loads((kd_run / "run.json").read_text())
    assert run["world_size"] == 2 and run["zero_stage"] == 3 and run["teacher_ep_size"] == 2
    experts = [set(r["teacher"]["local_expert_ids"]) for r in run["per_rank"]]
    n = run["teacher_num_experts"]
    assert experts[0].isdisjoint(experts[1]) and experts[0] | experts[1] == set(range(n))
    assert all(len(e) == n // 2 for e in experts)
    held = [r["student_partitioned_params"] for r in run["per_rank"]]
    assert sum(held) >= run["student_total_params"] and max(held) < 0.6 * run["student_total_params"]
    assert all(r["teacher"]["expert_param_bytes"] > 0 for r in run["per_rank"])
    assert set(run["versions"]) >= {"torch", "deepspeed", "transformers", "ds_moekd", "accelerate"} and run["wall_s"] > 0
    assert run["numerics"]["intra_op_threads"] == 1 and run["numerics"]["torch_cpu_capability"]
    assert run["eval"]["before"]["examples"] == 4


def test_held_out_rows_are_teacher_undistilled_and_the_named_student(kd_run):
    ev = json.loads((kd_run / "run.json").read_text())["eval"]
    assert ev["teacher"]["examples"] == ev["before"]["examples"] == ev["after"]["examples"] == 4
    best = json.loads((kd_run / "best_student_hf" / "best.json").read_text())
    assert ev["after_student"] == f"best by validation {best['metric']} (step {best['step']})"
    assert ev["data"] != load_config(kd_run / "config.yaml").data.valid_file  # not the set that chose it
    report = (kd_run / "report.md").read_text()
    assert "| teacher |" in report and f"| student after kd, {ev['after_student']} |" in report


def test_exported_student_carries_its_prompt_format(kd_run):
    from transformers import pipeline

    from ds_moekd.data.chat import ALPACA_CHAT_TEMPLATE
    from ds_moekd.data.formats import load_eval_data
    from ds_moekd.data.template import alpaca_prompt

    export = kd_run / "student_hf"
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template == ALPACA_CHAT_TEMPLATE  # trained on Alpaca prompts, stored with the model
    record = load_eval_data(load_config(kd_run / "config.yaml").data.valid_file).records[0]
    content = f"{record.instruction}\n\n{record.input}"  # one user message: the template's instruction
    chat = pipeline("text-generation", model=str(export), device="cpu")
    # min_new_tokens: a briefly trained student may answer EOS at once, and '' == '' would prove nothing
    greedy = {"max_new_tokens": 8, "min_new_tokens": 4, "do_sample": False}
    reply = chat([{"role": "user", "content": content}], **greedy)
    # Reference: greedy decoding of the Alpaca prompt, exactly as training and evaluation render it.
    model = AutoModelForCausalLM.from_pretrained(export)
    ids = tokenizer(alpaca_prompt(content), return_tensors="pt", add_special_tokens=False).input_ids
    expected = tokenizer.decode(model.generate(ids, **greedy)[0, ids.shape[1]:], skip_special_tokens=True)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": expected} and expected.strip()


def test_metrics_have_one_line_per_step(kd_run):
    metrics = read_metrics(kd_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "kl", "lr", "tokens_per_s", "teacher_s", "student_s", "peak_memory_mb"):
        assert all(key in m for m in metrics), key
    assert all(m["teacher_s"] > 0 for m in metrics)
    # KD loss = 0.5 CE + 0.5 KL, logged as global means
    for m in metrics:
        assert m["loss"] == pytest.approx(0.5 * m["ce"] + 0.5 * m["kl"], rel=1e-6)


def test_exported_student_loads_and_generates(kd_run):
    model = AutoModelForCausalLM.from_pretrained(kd_run / "student_hf")
    tokenizer = AutoTokenizer.from_pretrained(kd_run / "student_hf")
    out = model.generate(**tokenizer("Sort:", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1
    # the exported weights are the trained ones, not the starting point
    run_cfg = load_config(kd_run / "config.yaml")
    start = AutoModelForCausalLM.from_pretrained(run_cfg.student.path)
    changed = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values())]
    assert all(changed)


def test_run_folder_has_config_report_and_checkpoint(kd_run):
    assert (kd_run / "config.yaml").is_file() and (kd_run / "loss.png").stat().st_size > 1000
    report = (kd_run / "report.md").read_text()
    assert "ZeRO stage 3" in report and "expert-parallel size 2" in report
    assert (kd_run / "checkpoints" / "latest").read_text().strip() == f"step{STEPS}"


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(kd_run, rank_pool2, tiny_demo, tmp_path):
    # A crash after step 3: the run folder holds the step-3 checkpoint and 3 metric lines.
    crashed = tmp_path / "e2e"
    shutil.copytree(kd_run, crashed)
    shutil.rmtree(crashed / "checkpoints" / f"step{STEPS}")
    (crashed / "checkpoints" / "latest").write_text("step3")
    # Mark the lines written before the crash (one past the checkpoint) to see which survive.
    logged = [{**m, "before_crash": True} for m in read_metrics(crashed / "metrics.jsonl")[:4]]
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in logged))
    scores = [json.loads(line) for line in (crashed / "validation.jsonl").read_text().splitlines()]
    (crashed / "validation.jsonl").write_text(json.dumps({**scores[0], "before_crash": True}) + "\n")
    rank_pool2.run(train_on_rank, REPO / "ds_configs/methods/kd.yaml",
                   e2e_overrides(tiny_demo, tmp_path) + ["train.resume=true"], timeout_s=600)

    resumed = read_metrics(crashed / "metrics.jsonl")
    original = read_metrics(kd_run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m.get("before_crash", False) for m in resumed] == [True] * 3 + [False] * (STEPS - 3)
    for a, b in zip(resumed, original):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    resumed_scores = [json.loads(line) for line in (crashed / "validation.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("before_crash", False)) for r in resumed_scores] == [(3, True), (6, False)]
    assert resumed_scores[1]["rouge_l"] == pytest.approx(scores[1]["rouge_l"])
    final = AutoModelForCausalLM.from_pretrained(crashed / "student_hf").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(kd_run / "student_hf").state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
