"""`ds-moekd bench e2e` end to end on the demo, 2 ranks, a few steps: both systems train on the
same batches (their first losses agree closely: the same models, KD loss averaged per rank in
the baseline against the global token mean in ours), and the JSON holds the ratios it reports."""

from __future__ import annotations

import json

import pytest

from ds_moekd.bench.e2e import main


def test_bench_e2e_runs_both_systems_on_the_same_batches(tmp_path, capsys):
    out = tmp_path / "e2e_kd"
    main(["--size", "demo", "--steps", "3", "--skip", "1", "--rounds", "1", "--micro-batch", "4",
          "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())["results"][0]
    ours, baseline = result["runs"]["ours"][0], result["runs"]["baseline"][0]
    assert ours["measured_steps"] == baseline["measured_steps"] == 2
    assert ours["first_losses"][0] == pytest.approx(baseline["first_losses"][0], rel=0.05)
    assert result["tokens_per_s_ratio"] == pytest.approx(
        result["median_tokens_per_s"]["ours"] / result["median_tokens_per_s"]["baseline"])
    assert all(m > 100 for m in ours["peak_rss_mib_per_rank"] + baseline["peak_rss_mib_per_rank"])
    assert out.with_suffix(".png").is_file()
    assert "ours/baseline tokens/s" in capsys.readouterr().out


def test_methods_without_a_baseline_are_refused():
    with pytest.raises(SystemExit, match="only kd"):
        main(["--method", "ka"])
