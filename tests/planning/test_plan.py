"""`ds-moekd plan`: parameter counts and shard sizes of published models against hand computation
from their config.json values, the fit / smallest-EP logic, and the plan's peak against the
measured peak resident set of real CPU runs (within 15%)."""

from __future__ import annotations

import pytest
from helpers import REPO

from ds_moekd.config import load_config
from ds_moekd.planning.plan import main, plan
from ds_moekd.planning.shapes import student_shape, teacher_shape

MODELS = REPO / "ds_configs/cluster/models"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the cluster configs name their files relative to the repo root


def test_mixtral_8x7b_expert_shard_at_ep8_matches_hand_computation():
    t = teacher_shape(MODELS / "mixtral-8x7b")
    per_expert = 3 * 4096 * 14336  # w1, w3 [14336, 4096] and w2 [4096, 14336]
    assert t.params_per_expert == per_expert and t.expert_params == 32 * 8 * per_expert
    embeddings = 2 * 32000 * 4096  # input embeddings and lm_head (untied)
    attention = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)  # q, o [4096, 4096]; k, v [1024, 4096] (8 KV heads)
    routers, norms = 32 * 8 * 4096, 32 * 2 * 4096 + 4096
    assert t.replicated_params == embeddings + attention + routers + norms
    assert t.expert_params + t.replicated_params == 46_702_792_704  # Mixtral-8x7B's published 46.7B
    cfg = load_config(REPO / "ds_configs/cluster/mixtral-8x7b_to_1b_2x8xH100.yaml")
    parts = plan(cfg, world_size=16, device="gpu", ep_size=8)["memory_bytes"]
    assert parts["teacher expert shard"] == 32 * 8 * per_expert / 8 * 2  # bf16: 10.5 GiB per rank
    assert parts["teacher replicated weights"] == t.replicated_params * 2


def test_published_totals_and_active_experts():
    assert teacher_shape(MODELS / "qwen3-30b-a3b").expert_params == 48 * 128 * 3 * 2048 * 768
    deepseek = teacher_shape(MODELS / "deepseek-v3-fp8")
    assert deepseek.moe_layers == 58 and deepseek.num_experts == 256 and deepseek.fp8_checkpoint
    assert round((deepseek.expert_params + deepseek.replicated_params) / 1e9) == 671
    llama_moe = teacher_shape(MODELS / "llama-moe-3.5b-4of16")  # 16 experts of 688 split LLaMA-2-7B's MLP
    assert llama_moe.expert_params == 32 * 16 * 3 * 4096 * 688 and llama_moe.top_k == 4
    assert round(student_shape(MODELS / "qwen3-1.7b").params / 1e9, 2) == 1.72  # tied embeddings


def test_student_zero3_states_and_offload():
    cfg = load_config(REPO / "ds_configs/cluster/mixtral-8x7b_to_1b_2x8xH100.yaml")
    params = student_shape(MODELS / "student-1b-mixtral-vocab").params
    parts = plan(cfg, world_size=16, device="gpu")["memory_bytes"]
    assert parts["student params (ZeRO-3 partition)"] == params * 2 / 16
    assert parts["student optimizer states (partition)"] == params * 12 / 16  # fp32 master, m, v
    offload = load_config(REPO / "ds_configs/cluster/mixtral-8x7b_to_1b_2x8xH100.yaml",
                          [f"student.deepspeed_config={REPO}/ds_configs/zero3_offload.json"])
    parts = plan(offload, world_size=16, device="gpu")["memory_bytes"]
    assert parts["student optimizer states (partition)"] == 0 and parts["host: student optimizer states"] > 0


def test_fit_smallest_ep_and_k_of_n_suggestion(capsys):
    cfg = load_config(REPO / "ds_configs/cluster/qwen3-30b-a3b_to_1.7b_8xH100.yaml")
    tight = plan(cfg, world_size=8, device="gpu", gpu_memory_gib=24, ep_size=1)
    assert not tight["fits"] and tight["smallest_fitting_ep"] in (2, 4, 8)
    ep = tight["smallest_fitting_ep"]
    assert plan(cfg, world_size=8, device="gpu", gpu_memory_gib=24, ep_size=ep)["fits"]
    assert not plan(cfg, world_size=8, device="gpu", gpu_memory_gib=24, ep_size=ep // 2)["fits"]
    assert tight["suggested_ka_num_selected"] == 16  # 128 experts, top-8: 2·top-k
    flops = tight["flops_per_token"]
    native, every = (next(v for k, v in flops.items() if k.startswith(p)) for p in ("teacher native", "teacher all"))
    assert 5 < every / native < 16  # 16x the expert FLOPs; attention and lm_head dilute it
    main(["--config", str(REPO / "ds_configs/cluster/qwen3-30b-a3b_to_1.7b_8xH100.yaml"), "--world-size", "8",
          "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert "teacher expert shard" in out and "fits in 80 GiB" in out and "ka.num_selected=16" in out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_plan_agrees_with_measured_peak_memory(tiny_demo, tmp_path, world):
    from ds_moekd.bench.plan_check import measure
    from ds_moekd.bench.random_teacher import build_random_teacher

    teacher = build_random_teacher(tmp_path / "teacher", tiny_demo / "teacher", layers=2, hidden=512, inter=1408)
    row = measure("check", tmp_path / "runs", tiny_demo, teacher, world=world)
    assert row["measured_peak_mib"] > 0
    assert abs(row["error"]) < 0.15, row


def test_the_baseline_plan_holds_the_whole_teacher_and_an_unpartitioned_ddp_student():
    cfg = load_config(REPO / "ds_configs/cluster/mixtral-8x7b_to_1b_2x8xH100.yaml")
    ours = plan(cfg, world_size=16, device="gpu", ep_size=8)
    base = plan(cfg, world_size=16, device="gpu", ep_size=8, baseline=True)
    t, s = teacher_shape(MODELS / "mixtral-8x7b"), student_shape(REPO / cfg.student.path)
    assert base["system"] == "baseline" and base["layout"]["ep_size"] == 1 and base["layout"]["zero_stage"] == 0
    assert base["memory_bytes"]["teacher expert shard"] == t.expert_params * 2 == 8 * ours["memory_bytes"][
        "teacher expert shard"]
    mixed = 12  # fp32 master weights and AdamW m, v per parameter, whole on every rank
    assert base["memory_bytes"]["student optimizer states (partition)"] == s.params * mixed
    assert base["memory_bytes"]["student DDP gradient buckets"] == s.params * 2
    assert "full logits + loss buffers" in base["memory_bytes"] and "fused-head loss buffers" not in base["memory_bytes"]
    assert base["device_total_bytes"] > ours["device_total_bytes"]
