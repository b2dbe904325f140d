"""`ds-moekd bench` at toy sizes: every implementation is measured or says why not, all compute the
same layer (ours: the teacher's own MoE block and MoETeacher, at EP 1 and over 2 gloo ranks), and
the JSON carries what the results table needs (no timing is asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.tiny_moe_checkpoints import NUM_EXPERTS, VOCAB, save_mixtral

from ds_moekd.bench.ka_draws import VARIANTS
from ds_moekd.bench.moe_layer import main as moe_layer_main
from ds_moekd.bench.teacher_forward import run as teacher_run
from ds_moekd.cli import main as cli_main


def test_moe_layer_bench_reports_every_implementation_against_the_gemm(tmp_path):
    out = tmp_path / "r.json"
    cli_main(
        [
            "bench",
            "moe-layer",
            "--preset",
            "tiny",
            "--routing",
            "ka",
            "--tokens",
            "32",
            "--ka-draws",
            "2",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["tokens"] == 64 and result["experts_per_token"] == 7 and result["ours_path"] == "dense"
    assert result["useful_gflop"] == round(2 * 64 * 7 * 3 * 128 * 256 / 1e9, 3)
    impls = result["implementations"]
    assert set(impls) == {
        "transformers_eager",
        "transformers_grouped_mm",
        "transformers_batched_mm",
        "torch_grouped_mm",
        "megablocks",
        "ours",
        "ours_sequential_draws",
    }
    assert "needs a CUDA device" in impls["megablocks"]["not_measured"]
    for name in ("transformers_eager", "transformers_grouped_mm", "torch_grouped_mm", "ours"):
        assert impls[name]["max_rel_diff_vs_ours"] < 1e-5, name
        assert impls[name]["ratio_to_gemm"] > 0 and impls[name]["tflops"] >= 0
    assert result["transformers_fastest"] in ("transformers_eager", "transformers_grouped_mm")
    assert "cpu" in result["device"] and result["versions"]["torch"]


def test_native_routing_takes_the_sparse_path(tmp_path):
    out = tmp_path / "r.json"
    args = ["--preset", "tiny", "--routing", "native", "--tokens", "16", "--warmup", "0", "--iters", "1"]
    moe_layer_main([*args, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["ours_path"] == "sparse" and result["experts_per_token"] == 2 and result["tokens"] == 16
    assert result["useful_gflop"] == round(2 * 16 * 2 * 3 * 128 * 256 / 1e9, 3)
    assert result["ep_size"] == 1
    assert result["implementations"]["ours"]["max_rel_diff_vs_ours"] == 0
    assert result["implementations"]["transformers_eager"]["max_rel_diff_vs_ours"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("routing,path", [("native", "sparse"), ("all", "dense")])
def test_moe_layer_bench_runs_the_teacher_block_expert_parallel_over_two_ranks(tmp_path, routing, path):
    out = tmp_path / "r.json"
    cli_main(["bench", "moe-layer", "--preset", "tiny", "--routing", routing, "--tokens", "24", "--ep", "2"]
             + ["--warmup", "0", "--iters", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["ep_size"] == 2 and result["ours_path"] == path and result["tokens"] == 24
    impls = result["implementations"]
    # each rank's tokens through its half of the experts and the other rank's: transformers' whole layer
    for name in ("transformers_eager", "transformers_grouped_mm"):
        assert impls[name]["max_rel_diff_vs_ours"] < 1e-5, name


def test_teacher_bench_runs_the_moe_teacher_with_transformers_logits():
    result = teacher_run(
        "tiny",
        "all",
        batch=1,
        seq=8,
        layers=1,
        vocab=64,
        heads=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
        warmup=0,
        iters=1,
    )
    impls = result["implementations"]
    assert impls["ours"]["ms"] > 0 and result["ep_size"] == 1
    assert impls["transformers_eager"]["max_abs_logit_diff_vs_ours"] < 1e-4
    assert impls["transformers_grouped_mm"]["max_abs_logit_diff_vs_ours"] < 1e-4


@pytest.mark.slow
def test_teacher_bench_runs_the_moe_teacher_expert_parallel_over_two_ranks(tmp_path):
    out = tmp_path / "t.json"
    cli_main(["bench", "teacher", "--preset", "tiny", "--routing", "native", "--batch", "2", "--seq", "8"]
             + ["--layers", "1", "--vocab", "64", "--heads", "4", "--ep", "2", "--warmup", "0", "--iters", "1"]
             + ["--json", str(out)])
    result = json.loads(out.read_text())
    impls = result["implementations"]
    assert result["ep_size"] == 2 and impls["ours"]["ms"] > 0
    assert impls["transformers_eager"]["max_abs_logit_diff_vs_ours"] < 1e-4
    assert impls["transformers_grouped_mm"]["max_abs_logit_diff_vs_ours"] < 1e-4


def test_ka_bench_times_batched_and_sequential_draws_against_one_all_expert_forward(tmp_path):
    teacher = save_mixtral(str(tmp_path / "mixtral"))
    out = tmp_path / "ka.json"
    cli_main(
        ["bench", "ka", "--teacher", teacher, "--batch", "3", "--seq", "8", "--draws", "2"]
        + ["--warmup", "0", "--iters", "1", "--rounds", "2", "--threads", "1", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["benchmark"] == "ka" and result["family"] == "mixtral" and result["dtype"] == "float32"
    assert "cpu" in result["device"] and result["threads"] == 1 and result["versions"]["torch"]
    assert (result["batch"], result["seq"], result["draws"], result["vocab"]) == (3, 8, 2, VOCAB)
    assert result["num_experts"] == NUM_EXPERTS and result["ka_experts_per_token"] == NUM_EXPERTS - 1
    assert 8 <= result["real_tokens"] < 3 * 8  # row 0 full, the others right-padded
    # the M batched draws are the M sequential forwards' logits
    assert result["max_abs_logit_diff_batched_vs_sequential"] < 1e-4
    assert set(result["variants"]) == set(VARIANTS)
    for variant in result["variants"].values():
        assert variant["ms"] > 0 and len(variant["rounds_ms"]) == 2
    ratios = result["ratios"]
    for name in ("ka_batched_over_all", "ka_sequential_over_all", "all_over_native"):
        for table in (ratios, result["ratios_of_fastest_rounds"]):
            assert math.isfinite(table[name]) and table[name] > 0, name
    assert len(result["ka_batched_over_all_by_round"]) == 2
    assert result["target_ka_batched_over_all"] == 2.1
    assert result["target_met"] == (ratios["ka_batched_over_all"] <= 2.1)
    routing = result["routing"]
    assert routing["tokens_per_layer"] == 2 * result["real_tokens"]  # the MoE blocks route real tokens only
    for name in ("ka_route_ms", "ka_p0_route_ms", "ka_hash_ms", "all_route_ms", "ka_route_fraction_of_ka_batched"):
        assert math.isfinite(routing[name]) and routing[name] > 0, name
    assert routing["ka_hash_values"] >= 2 * result["real_tokens"]  # KA draws at least a resample coin per token
    assert result["source"]["commit"] is None or len(result["source"]["commit"]) == 40


def test_random_teacher_is_a_loadable_mixtral_and_is_reused(tiny_demo, tmp_path):
    from transformers import AutoModelForCausalLM

    from ds_moekd.bench.random_teacher import build_random_teacher
    from ds_moekd.teacher import MoETeacher

    out = build_random_teacher(tmp_path / "t", tiny_demo / "student", layers=1, hidden=32, experts=4, inter=64,
                               heads=2)
    stamp = (out / "model-00001.safetensors").stat().st_mtime_ns
    assert build_random_teacher(out, tiny_demo / "student") == out  # kept, not rebuilt
    assert (out / "model-00001.safetensors").stat().st_mtime_ns == stamp
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = MoETeacher.from_pretrained(str(out)).eval()(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_random_teacher_weights_are_written_in_shards_of_bounded_size(tiny_demo, tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    from ds_moekd.bench import random_teacher
    from ds_moekd.teacher import MoETeacher

    monkeypatch.setattr(random_teacher, "SHARD_BYTES", 64 * 1024)
    out = random_teacher.build_random_teacher(tmp_path / "t", tiny_demo / "student", layers=2, hidden=32, experts=4,
                                              inter=64, heads=2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:  # at most SHARD_BYTES of tensors, unless one tensor alone is larger
        tensors = load_file(f)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 64 * 1024
    teacher = MoETeacher.from_pretrained(str(out))
    assert sum(p.numel() * 4 for p in teacher.parameters()) == index["metadata"]["total_size"]
