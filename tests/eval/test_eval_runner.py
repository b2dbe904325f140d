"""`ds-moekd eval`: counter-based sampling, teacher decoding, sharding over 2 real ranks, routing, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO
from helpers.eval_models import write_eval_models
from transformers import AutoModelForCausalLM, AutoTokenizer

import ds_moekd.teacher.routing
from ds_moekd.data.formats import load_eval_data
from ds_moekd.decoding import Decoding, HFForward, decode
from ds_moekd.eval import cli as eval_cli
from ds_moekd.eval.router_mass import non_activated_gate_mass
from ds_moekd.eval.runner import EvalSettings, evaluate, load_settings, prompt_ids, summarize
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.rng import Sampling, sample_tokens
from ds_moekd.teacher import MoETeacher

SETTINGS = EvalSettings(seeds=(10, 20), max_new_tokens=6, batch_size=2)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_eval_models(tmp_path_factory.mktemp("eval_models"))


def sample_next(logits_BV, seed, keys_B, positions_B, vocab_limit=None):
    return sample_tokens(logits_BV, Sampling(), seed=seed, step=0, keys_B=keys_B, positions_B=positions_B,
                         vocab_limit=vocab_limit)


def test_counter_sampling_follows_softmax_and_depends_only_on_its_key():
    logits_V = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    keys = torch.arange(20000)
    at_3 = torch.full_like(keys, 3)
    tokens = sample_next(logits_V.expand(len(keys), -1), seed=10, keys_B=keys, positions_B=at_3)
    freq = torch.bincount(tokens, minlength=5).double() / len(keys)
    expected = torch.softmax(logits_V.double(), -1)
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / len(keys)))
    # A row's token depends on (seed, key, position) only: not on its batch neighbours.
    alone = sample_next(logits_V[None], seed=10, keys_B=keys[7:8], positions_B=at_3[:1])
    assert alone.item() == tokens[7].item()
    for other in ({"seed": 20, "positions_B": at_3}, {"seed": 10, "positions_B": at_3 + 1}):
        assert not torch.equal(tokens, sample_next(logits_V.expand(len(keys), -1), keys_B=keys, **other))
    hot = sample_next(torch.tensor([[0.0, 50.0, 0.0, 0.0, 0.0, 99.0]]), seed=1, keys_B=keys[:1],
                      positions_B=at_3[:1], vocab_limit=5)
    assert hot.item() == 1  # ids past the tokenizer (padded lm_head rows) are never drawn


@pytest.mark.parametrize("seed", [None, 10])
def test_teacher_decoding_matches_transformers_model(paths, seed):
    """The teacher's decoding forward emits what transformers' own Mixtral does through the same
    decoder, greedy and sampled (one sampling rule)."""
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    records = load_eval_data(paths["test"]).records
    prompts = [prompt_ids(r, tokenizer, "alpaca") for r in records]
    keys = list(range(len(prompts)))
    decoding = Decoding(max_new_tokens=6, sampling=None if seed is None else Sampling(), seed=seed or 0,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        vocab_limit=len(tokenizer), batch_size=3)
    reference = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    expected = decode(HFForward(reference), prompts, keys, decoding)
    teacher = MoETeacher.from_pretrained(paths["teacher"])
    got = decode(teacher.decoding_forward(ds_moekd.teacher.routing.NativeTopK()), prompts, keys, decoding)
    assert got == expected and len({tuple(r) for r in got}) > 2


KA_DRAWS = ds_moekd.teacher.routing.KASample(resample_prob=0.5, num_selected=2, seed=3)  # many draws really resample


def _evaluate_on_ranks(paths: dict, backend: str) -> dict:
    import torch.distributed as dist

    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    data = load_eval_data(paths["test"])
    records = data.records[:5]  # rank 0 decodes 3 prompts in 2 batches, rank 1 two in 1 real + 1 dummy batch
    data = type(data)(records, data.format, data.source)
    lockstep = None
    if backend != "student":
        groups = ParallelGroups.create(ep_size=2)
        model, lockstep = MoETeacher.from_pretrained(paths["teacher"], groups=groups), groups.ep_group
        forward = model.decoding_forward(KA_DRAWS if backend == "moe-ka" else None)
    else:
        model = AutoModelForCausalLM.from_pretrained(paths[backend]).eval()
        forward = HFForward(model)
    result = evaluate(forward, tokenizer, data, SETTINGS, rank=dist.get_rank(), world_size=2,
                      world_group=dist.group.WORLD, progress=False)
    if backend == "moe":  # 3 vs 2 prompts per rank, batch 2: rank 1 runs a dummy batch in lockstep
        prompts = [prompt_ids(r, tokenizer, "alpaca") for r in records][dist.get_rank()::2]
        keys = list(range(len(records)))[dist.get_rank()::2]
        result["gate"] = non_activated_gate_mass(model, prompts, keys, tokenizer.pad_token_id, batch_size=2,
                                                 world_group=dist.group.WORLD, lockstep_group=lockstep)
    return result


@pytest.mark.parametrize("backend", ["student", "moe", "moe-ka"])
def test_two_ranks_equal_one_process(rank_pool2, paths, backend):
    """Sharded sampling over 2 ranks (EP-2 teacher in lockstep) gives the 1-process results exactly."""
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    data = load_eval_data(paths["test"])
    data = type(data)(data.records[:5], data.format, data.source)
    # The single-process reference: transformers' own model (for the teacher: native routing), or
    # for KA draws the 1-process MoETeacher in one batch (KA draws keyed by the prompts' global indices,
    # not by their rows).
    settings, routing = SETTINGS, None
    if backend == "moe-ka":
        single_model, routing = MoETeacher.from_pretrained(paths["teacher"]), KA_DRAWS
        settings = dataclasses.replace(SETTINGS, batch_size=5)
    else:
        single_model = AutoModelForCausalLM.from_pretrained(paths["student" if backend == "student" else "teacher"])
        single_model = single_model.eval()
    single_forward = HFForward(single_model) if routing is None else single_model.decoding_forward(routing)
    single = evaluate(single_forward, tokenizer, data, settings, progress=False)
    ranks = rank_pool2.run(_evaluate_on_ranks, paths, backend)
    for result in ranks:
        assert result["per_seed"] == single["per_seed"] and result["examples"] == single["examples"]
        assert result["per_category"] == single["per_category"]
    assert ranks[0]["counts"] == single["counts"] == {"records": 5, "evaluated": 5, "dropped_long_prompt": 0,
                                                      "dropped_no_reference": 0, "evaluated_fraction": 1.0}
    assert len({e["prediction"] for e in single["examples"]}) > 2  # really different texts per prompt
    if backend == "moe":
        expected = reference_gate_mass(single_model, [prompt_ids(r, tokenizer, "alpaca") for r in data.records])
        for result in ranks:
            assert result["gate"]["tokens"] == expected["tokens"]
            assert result["gate"]["non_activated_gate_mass"] == pytest.approx(expected["mass"], abs=1e-5)


@torch.no_grad()
def reference_gate_mass(model, prompts: list[list[int]]) -> dict:
    """From transformers' own router logits (output_router_logits), one prompt at a time (no padding)."""
    sums, tokens = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64), 0
    for ids in prompts:
        out = model(torch.tensor([ids]), output_router_logits=True)
        for layer, logits_TN in enumerate(out.router_logits):
            top_T = torch.softmax(logits_TN.float(), -1).topk(model.config.num_experts_per_tok, -1).values.sum(-1)
            sums[layer] += float((1 - top_T).sum())
        tokens += len(ids)
    return {"mass": (sums / tokens).tolist(), "tokens": tokens}


def test_summary_means_stds_and_categories():
    from ds_moekd.data.instructions import InstructionRecord

    records = [InstructionRecord("i", "", ("a b",), {"category": "x"}), InstructionRecord("i", "", ("c",), {})]
    # Seed 1: both right; seed 2: first right, second wrong.
    out = summarize(records, (1, 2), [["a b", "c"], ["A B!", "d"]])
    assert [s["exact_match"] for s in out["per_seed"]] == [100.0, 50.0]
    assert [s["exact_match_strict"] for s in out["per_seed"]] == [100.0, 0.0]
    assert out["exact_match"] == {"mean": 75.0, "std": 25.0}
    assert out["per_category"] == {"x": {"count": 1, "rouge_l": {"mean": 100.0, "std": 0.0},
                                         "exact_match": {"mean": 100.0, "std": 0.0},
                                         "exact_match_strict": {"mean": 50.0, "std": 50.0}}}


def test_cli_counts_dropped_prompts_and_records_settings(paths, tmp_path):
    out = tmp_path / "r.json"
    lengths = sorted(len(prompt_ids(r, AutoTokenizer.from_pretrained(paths["student"]), "alpaca"))
                     for r in load_eval_data(paths["test"]).records)
    limit = lengths[2]  # keeps the 3 shortest prompts (ties aside)
    eval_cli.main(["--model", paths["student"], "--data", paths["test"], "--greedy", "--max-new-tokens", "4",
                   "--max-prompt-tokens", str(limit), "--out", str(out)])
    result = json.loads(out.read_text())
    kept = sum(n <= limit for n in lengths)
    assert result["counts"] == {"records": 8, "evaluated": kept, "dropped_long_prompt": 8 - kept,
                                "dropped_no_reference": 0, "evaluated_fraction": round(kept / 8, 4)}
    assert result["settings"]["greedy"] and result["settings"]["max_prompt_tokens"] == limit
    assert result["model"]["kind"] == "student" and result["data"]["format"] == "minillm"
    assert [s["seed"] for s in result["per_seed"]] == [None]


def _routed_reference(paths: dict, experts_per_token: int) -> dict:
    """transformers' own Mixtral with `num_experts_per_tok` overridden, through the same evaluate()."""
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    model = AutoModelForCausalLM.from_pretrained(paths["teacher"], num_experts_per_tok=experts_per_token).eval()
    settings = EvalSettings(greedy=True, max_new_tokens=6, batch_size=3)
    return evaluate(HFForward(model), tokenizer, load_eval_data(paths["test"]), settings, progress=False)


@pytest.mark.parametrize("routing, options, experts_per_token, recorded", [
    ("all", [], 4, {"policy": "all", "num_selected": 4}),
    ("ka", ["--ka-resample-prob", "0"], 3, {"policy": "ka", "resample_prob": 0.0, "num_selected": 3, "seed": 0}),
])
def test_cli_teacher_routing_equals_transformers_with_more_experts(paths, tmp_path, routing, options,
                                                                   experts_per_token, recorded):
    """ALL = Mixtral with k=N; KA with λ=0 = Mixtral with k=N-1 (greedy, 4 experts, native k=2)."""
    args = ["--model", paths["teacher"], "--data", paths["test"], "--greedy", "--max-new-tokens", "6",
            "--batch-size", "3", "--out", str(tmp_path / "r.json")]
    got = eval_cli.main([*args, "--routing", routing, *options])
    assert got["model"]["backend"] == "MoETeacher" and got["settings"]["routing"] == recorded
    expected = _routed_reference(paths, experts_per_token)
    assert got["examples"] == expected["examples"] and got["per_seed"] == expected["per_seed"]
    native = eval_cli.main([*args, "--routing", "native", "--backend", "hf"])  # diagnostics: a MoETeacher after
    assert native["model"]["backend"] == "transformers" and native["settings"]["routing"] == {"policy": "native"}
    assert native["examples"] != got["examples"]  # the routing really changed the text
    first_layer = [r["routing_diagnostics"]["non_activated_gate_mass"][0] for r in (native, got)]
    assert first_layer[0] == first_layer[1]  # the first MoE layer's input does not depend on routing


def test_cli_routing_options_need_a_teacher_and_ka(paths, tmp_path):
    args = ["--data", paths["test"], "--greedy", "--max-new-tokens", "2", "--out", str(tmp_path / "r.json")]
    with pytest.raises(ValueError, match="apply to a MoE teacher"):
        eval_cli.main(["--model", paths["student"], "--routing", "all", *args])
    with pytest.raises(ValueError, match="apply to --routing ka"):
        eval_cli.main(["--model", paths["teacher"], "--routing", "all", "--ka-seed", "3", *args])


def test_llama_moe_is_a_teacher_checkpoint_with_gate_diagnostics(paths, tmp_path):
    """transformers knows no llama_moe: detection reads config.json; diagnostics come from the MoETeacher."""
    from helpers.tiny_moe_checkpoints import save_llama_moe

    path = Path(save_llama_moe(str(tmp_path / "llama_moe")))
    assert eval_cli.is_moe_checkpoint(path) and not eval_cli.is_moe_checkpoint(Path(paths["student"]))
    teacher = MoETeacher.from_pretrained(str(path))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    gate = non_activated_gate_mass(teacher, prompts, [0, 1, 2], pad_token_id=0, batch_size=2)
    assert gate["tokens"] == 9 and len(gate["non_activated_gate_mass"]) == len(teacher.moe_blocks) == 2
    assert all(0.0 < m < 1.0 for m in gate["non_activated_gate_mass"])


def test_shipped_eval_settings_are_the_papers(tmp_path):
    configs = REPO / "ds_configs" / "eval"
    paper = load_settings(configs / "minillm.yaml")
    assert (paper.seeds, paper.greedy, paper.temperature) == ((10, 20, 30, 40, 50), False, 1.0)
    assert (paper.max_prompt_tokens, paper.max_new_tokens) == (256, 256)
    assert load_settings(configs / "demo.yaml", max_new_tokens=8).greedy
    (tmp_path / "bad.yaml").write_text("top_p: 0.9\n")
    with pytest.raises(ValueError, match=r"unknown evaluation settings \['top_p'\]"):
        load_settings(tmp_path / "bad.yaml")
