"""`ds-moekd bench e2e` end to end on the demo, 2 ranks, a few steps: both systems train on the
same batches (their first losses agree closely: the same models, the loss averaged per rank in
the baseline against the global token mean in ours), and the JSON holds the ratios it reports.
The baseline's routing of the transformers teacher (native, all experts, KA's draws) is checked
against ds-moekd's teacher in one process."""

from __future__ import annotations

import json

import pytest
import torch

from ds_moekd.bench.e2e import main


def _check(out, method):
    result = json.loads(out.with_name(f"{out.name}_{method}.json").read_text())["results"][0]
    ours, baseline = result["runs"]["ours"][0], result["runs"]["baseline"][0]
    assert result["method"] == method
    assert ours["measured_steps"] == baseline["measured_steps"]
    assert ours["first_losses"][0] == pytest.approx(baseline["first_losses"][0], rel=0.05)
    assert result["tokens_per_s_ratio"] == pytest.approx(
        result["median_tokens_per_s"]["ours"] / result["median_tokens_per_s"]["baseline"])
    assert all(m > 100 for m in ours["peak_rss_mib_per_rank"] + baseline["peak_rss_mib_per_rank"])
    assert out.with_name(f"{out.name}_{method}.png").is_file()
    return ours, baseline


@pytest.mark.slow
def test_bench_e2e_runs_both_systems_on_the_same_batches(tmp_path, capsys):
    out = tmp_path / "e2e"
    main(["--size", "demo", "--steps", "3", "--skip", "1", "--rounds", "1", "--micro-batch", "4", "--memory-steps", "2",
          "--work", str(tmp_path / "work"), "--out", str(out)])
    ours, baseline = _check(out, "kd")
    assert ours["measured_steps"] == 2
    assert set(ours["phase_s_per_rank"][0]) == {"teacher_s", "student_s"}
    assert "ours/baseline tokens/s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_e2e_on_policy_methods_agree_on_the_first_loss(tmp_path):
    """ka and sar in one interleaved run: the same rollouts, KA's same draws, SAR's router step."""
    out = tmp_path / "e2e"
    # speed only (--memory-steps 0): the separate peak-memory runs are the kd test's
    main(["--method", "ka,sar", "--size", "demo", "--steps", "2", "--skip", "1", "--rounds", "1", "--memory-steps", "0",
          "--micro-batch", "2", "--work", str(tmp_path / "work"), "--out", str(out), "gkd.max_new_tokens=8"])
    for method in ("ka", "sar"):
        ours, baseline = _check(out, method)
        assert "rollout_s" in ours["phase_s_per_rank"][0] and "rollout_s" in baseline["phase_s_per_rank"][0]
    _, baseline = _check(out, "sar")
    assert baseline["phase_s_per_rank"][0]["router_s"] > 0
    assert "ka" in out.with_name("e2e_methods.md").read_text()


def test_methods_without_a_baseline_are_refused():
    with pytest.raises(SystemExit, match="no authors'-style baseline"):
        main(["--method", "sft"])


@pytest.mark.parametrize("mode", ["native", "all", "ka"])
def test_baseline_routing_matches_the_ds_moekd_teacher(mode):
    """The baseline routes the transformers teacher as ds-moekd's teacher does: same logits."""
    from transformers import AutoModelForCausalLM

    from ds_moekd.bench.e2e_worker import _BaselineRouting
    from ds_moekd.data.batching import TokenizedExample, collate
    from ds_moekd.modelfiles.assets import resolve_path
    from ds_moekd.teacher import MoETeacher
    from ds_moekd.teacher.routing import AllExperts, KASample

    path = resolve_path("demo:teacher")
    ours = MoETeacher.from_pretrained(str(path)).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    routing = _BaselineRouting(hf, str(path))
    gen = torch.Generator().manual_seed(0)
    examples = [TokenizedExample(torch.randint(3, 900, (n,), generator=gen).tolist(),
                                 torch.randint(3, 900, (m,), generator=gen).tolist()) for n, m in ((5, 7), (9, 3))]
    batch = collate(examples, 0, example_ids=[11, 42])
    policy = {"native": None, "all": AllExperts(), "ka": KASample(resample_prob=0.5, seed=3).at_step(7)}[mode]
    with torch.no_grad():
        for draw in (0, 1):
            expected = ours(batch.input_ids, attention_mask=batch.attention_mask, routing=policy,
                            sequence_index=batch.example_ids,
                            draw_index=torch.full((2,), draw, dtype=torch.long)).logits
            routing.set("policy" if mode == "ka" else mode, policy, batch, draw)
            got = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            real = batch.attention_mask.bool()
            torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    if mode == "ka":  # the two draws differ (resampling at 0.5), so the keys reach the router
        routing.set("policy", policy, batch, 0)
        first = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        routing.set("policy", policy, batch, 1)
        second = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert not torch.allclose(first[real], second[real])


@pytest.mark.slow
def test_a_baseline_the_plan_says_cannot_fit_is_tried_once_and_its_failure_recorded(tmp_path, monkeypatch):
    """Told the machine has 0.5 GiB, the plan refuses the demo baseline: ours runs alone, the baseline
    is tried under a per-rank address-space limit and fails, and the table says so next to the plans."""
    from ds_moekd.bench import e2e

    monkeypatch.setattr(e2e, "machine_memory_gib", lambda: 0.5)
    out = tmp_path / "e2e"
    main(["--size", "demo", "--steps", "2", "--skip", "1", "--rounds", "1", "--micro-batch", "2",
          "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.with_name("e2e_kd.json").read_text())["results"][0]
    assert result["median_tokens_per_s"]["ours"] > 0 and result["median_tokens_per_s"]["baseline"] is None
    assert result["baseline_failed"] and result["tokens_per_s_ratio"] is None
    assert result["plan_peak_mib_per_rank"]["baseline"] > 0.5 * 1024 / 2
    assert "failed:" in out.with_name("e2e_kd.md").read_text()


def test_a_failed_runs_reason_is_its_allocation_error_without_machine_paths():
    from ds_moekd.bench.e2e import failure_reason

    output = """[rank0]: Traceback (most recent call last):
[rank0]: RuntimeError: unable to mmap 1618141848 bytes from file </data/x/teacher/model-00006.safetensors>: Cannot allocate memory (12)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""
    reason = failure_reason(output)
    assert reason.startswith("[rank0]: RuntimeError: unable to mmap") and "<model-00006.safetensors>" in reason
    assert "/data/" not in reason
    assert failure_reason("ValueError: bad\ntorch...ChildFailedError:\n") == "ValueError: bad"
