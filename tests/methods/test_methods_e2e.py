"""The on-policy methods as whole training jobs on 2 real ranks (EP-2 teacher, ZeRO-3 student):
exact resume after a stop, and SAR's exported teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.training_runs import REPO, e2e_overrides, train_on_rank
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ds_moekd.runtime.telemetry import read_metrics

STEPS = 4


def _method_overrides(tiny_demo, out, method):
    return e2e_overrides(tiny_demo, out) + [
        f"name={method}", f"method={method}", f"train.steps={STEPS}", "train.save_every=2", "validation.every=0",
        "gkd.max_new_tokens=8", "ka.resample_prob=0.5", "sar.router_lr=1e-3", "gkd.rollout=layerwise",
    ]


@pytest.fixture(scope="module")
def method_runs(rank_pool2, tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("method_runs")
    for method in ("gkd", "ka", "sar"):
        rank_pool2.run(train_on_rank, REPO / "ds_configs/methods/kd.yaml", _method_overrides(tiny_demo, out, method),
                       timeout_s=600)
    return out


@pytest.mark.parametrize("method", ["gkd", "ka", "sar"])
def test_resume_after_a_stop_reproduces_the_uninterrupted_run(method_runs, rank_pool2, tiny_demo, tmp_path, method):
    run = method_runs / method
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["rollout_s"] > 0 and m["on_policy_examples"] == 6 for m in metrics)  # every example on-policy
    assert all(m["loss"] == pytest.approx(m["rkl"], rel=1e-6) for m in metrics)  # pure reverse KL
    if method == "sar":
        assert all(m["router_s"] > 0 and m["router_grad_norm"] > 0 for m in metrics)

    stopped = tmp_path / method
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "checkpoints" / f"step{STEPS}")
    (stopped / "checkpoints" / "latest").write_text("step2")
    shutil.rmtree(stopped / "sar_teacher_hf", ignore_errors=True)
    rank_pool2.run(train_on_rank, REPO / "ds_configs/methods/kd.yaml",
                   _method_overrides(tiny_demo, tmp_path, method) + ["train.resume=true"], timeout_s=600)

    resumed = read_metrics(stopped / "metrics.jsonl")
    for a, b in zip(resumed, metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["response_tokens"] == b["response_tokens"]  # the same rollouts
    final = AutoModelForCausalLM.from_pretrained(stopped / "student_hf").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(run / "student_hf").state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    if method == "sar":  # routers and their optimizer state came back from the checkpoint
        for name, tensor in _tensors(run / "sar_teacher_hf").items():
            torch.testing.assert_close(_tensors(stopped / "sar_teacher_hf")[name], tensor, rtol=1e-6, atol=1e-8)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_sar_exports_a_teacher_whose_only_changes_are_its_routers(method_runs, tiny_demo):
    exported = method_runs / "sar" / "sar_teacher_hf"
    source, tuned = _tensors(tiny_demo / "teacher"), _tensors(exported)
    assert set(source) == set(tuned)
    changed = {name for name in source if not torch.equal(source[name], tuned[name])}
    routers = {name for name in source if name.endswith(".gate.weight") and "experts" not in name}
    assert changed == routers and routers  # every router moved, nothing else did
    assert json.loads((exported / "config.json").read_text()) == json.loads((tiny_demo / "teacher/config.json")
                                                                              .read_text())
    model = AutoModelForCausalLM.from_pretrained(exported)  # transformers reads it as any checkpoint
    assert model.config.model_type == "mixtral"
