"""`ds-moekd bench` at toy sizes: every implementation is measured or says why not, all compute the
same layer, and the JSON carries what the results table needs (no timing is asserted)."""

from __future__ import annotations

import json

import torch

from ds_moekd.bench.moe_layer import main as moe_layer_main
from ds_moekd.bench.teacher import run as teacher_run
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
        "python_loop",
        "transformers_eager",
        "transformers_grouped_mm",
        "transformers_batched_mm",
        "torch_grouped_mm",
        "megablocks",
        "ours",
        "ours_sequential_draws",
    }
    assert "needs a CUDA device" in impls["megablocks"]["not_measured"]
    for name in ("python_loop", "transformers_eager", "transformers_grouped_mm", "torch_grouped_mm", "ours"):
        assert impls[name]["max_rel_diff_vs_ours"] < 1e-5, name
        assert impls[name]["ratio_to_gemm"] > 0 and impls[name]["tflops"] >= 0
    assert result["transformers_fastest"] in ("transformers_eager", "transformers_grouped_mm")
    assert "cpu" in result["device"] and result["versions"]["torch"]


def test_native_routing_takes_the_sparse_path():
    moe_layer_main(
        [
            "--preset",
            "tiny",
            "--routing",
            "native",
            "--tokens",
            "16",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
            "/dev/null",
        ]
    )


def test_teacher_bench_swaps_in_our_experts_with_the_same_logits():
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
    assert impls["ours"]["ms"] > 0
    assert impls["transformers_eager"]["max_abs_logit_diff_vs_ours"] < 1e-4
    assert impls["transformers_grouped_mm"]["max_abs_logit_diff_vs_ours"] < 1e-4
