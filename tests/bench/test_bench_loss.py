"""`ds-moekd bench loss` at a small size: the three loss implementations agree, and the fused lm_head
head's peak memory is far below the whole-logits step (measured per implementation in a fresh
process on CPU; no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from ds_moekd.cli import main as cli_main


@pytest.mark.slow
def test_loss_bench_fused_head_matches_and_holds_no_full_logits(tmp_path):
    out = tmp_path / "loss.json"
    cli_main(["bench", "loss", "--tokens", "512", "--hidden", "32", "--teacher-hidden", "48", "--vocab", "6000",
              "--chunk", "64", "--warmup", "0", "--iters", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    impls = result["implementations"]
    assert set(impls) == {"full_logits_torch", "ours_on_logits", "ours_fused"}
    full = impls["full_logits_torch"]
    for name, r in impls.items():
        assert r["loss_rel_diff"] < 1e-5, name
        assert abs(r["grad_hidden"] - full["grad_hidden"]) <= 1e-4 * full["grad_hidden"], name
    # whole logits: student + teacher [512, 6000] fp32 and their softmax/gradient copies, 12 MB each;
    # the fused head holds [64, 6000] slabs
    assert full["peak_mb"] > 20
    assert impls["ours_fused"]["peak_mb"] < 0.5 * full["peak_mb"], impls


def test_the_three_loss_implementations_agree_in_this_process():
    """The quick tier's part: the same loss and gradient from every implementation (no memory figure:
    a clean high-water mark needs the fresh processes of the test above)."""
    import torch

    from ds_moekd.bench.loss import IMPLEMENTATIONS, measure
    from ds_moekd.bench.options import RunOptions

    shape = {"tokens": 64, "hidden": 16, "teacher_hidden": 24, "vocab": 500}
    opts = RunOptions(device=torch.device("cpu"), dtype=torch.float32, warmup=0, iters=1)
    results = {name: measure(name, shape, opts, chunk=16) for name in IMPLEMENTATIONS}
    full = results["full_logits_torch"]
    for name, r in results.items():
        assert r["loss"] == pytest.approx(full["loss"], rel=1e-5), name
        assert r["grad_hidden"] == pytest.approx(full["grad_hidden"], rel=1e-4), name
