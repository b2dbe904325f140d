"""`ds-moekd bench placement` on the demo teacher over 2 gloo ranks: the JSON carries the work per
rank, its imbalance and the logit check of every placement (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from ds_moekd.cli import main as cli_main


@pytest.mark.slow
def test_placement_bench_compares_placements_in_the_same_ranks(tmp_path):
    out, loads = tmp_path / "placement.json", tmp_path / "loads.json"
    cli_main(["bench", "placement", "--size", "demo", "--ep", "2", "--rounds", "2", "--iters", "1", "--warmup", "0",
              "--micro-batch", "2", "--calibration", "1", "--save-loads", str(loads), "--json", str(out)])
    result = json.loads(out.read_text())
    placements = result["placements"]
    assert list(placements) == ["contiguous", "contiguous_again", "balanced", "balanced+1"]
    assert json.loads(loads.read_text())["loads"] == result["calibration_loads"]
    work = {name: [sum(layer) for layer in p["assignments_per_layer_per_rank"]] for name, p in placements.items()}
    assert len({tuple(w) for w in work.values()}) == 1  # the same assignments, spread differently
    contiguous, balanced = placements["contiguous"], placements["balanced"]
    assert balanced["imbalance_expected"] <= contiguous["imbalance_expected"]
    assert balanced["max_abs_hidden_diff_vs_contiguous"] == 0.0
    assert placements["balanced+1"]["max_abs_hidden_diff_vs_contiguous"] <= 1e-5
    assert len(contiguous["ms_by_round"]) == 2 and all(ms > 0 for ms in contiguous["ms_by_round"])
    assert set(result["expected_imbalance_by_ep_size"]) == {"2", "4", "8"}
