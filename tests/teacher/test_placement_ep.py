"""Expert placement on 2 real gloo ranks against one process without it.

Teachers whose ranks hold a shuffled set of experts (a different one per MoE layer, slots not in
expert order), with and without replicas of experts on both ranks, must give each rank's rows the
logits one process gives the concatenated batch, for native top-k (the sparse all-to-all and the
gathered exchange) and all-expert routing (the dense exchange). The calibration pass and the loads
file must give every rank the same balanced placement.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from ds_moekd.kernels import grouped_swiglu_reference
from helpers.references import random_expert_weights
from helpers.tiny_moe_checkpoints import VOCAB, all_family_checkpoints

from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.teacher import MoETeacher, dispatch
from ds_moekd.teacher.calibration import apply_expert_placement, measure_expert_loads
from ds_moekd.teacher.placement import (
    ExpertPlacement,
    SlotMap,
    balanced_placement,
    contiguous_placement,
    imbalance,
    rank_loads,
    save_loads,
)
from ds_moekd.teacher.routing import AllExperts, NativeTopK

FAMILIES = ["mixtral", "mixtral_fused_sharded", "deepseek_v3", "qwen3_moe", "llama_moe"]
# Per MoE layer (cycled): the experts in rank 0's / rank 1's slots. Replicas: one extra slot per
# rank holding an expert whose primary slot is on the other rank.
SHUFFLED = [((7, 1, 3, 5), (0, 2, 4, 6)), ((0, 6, 2, 4), (3, 5, 1, 7))]
REPLICATED = [((7, 1, 3, 5, 0), (0, 2, 4, 6, 1)), ((0, 6, 2, 4, 5), (3, 5, 1, 7, 2))]
PATHS = ["all_to_all", "gathered"]  # the two sparse exchanges of native top-k (dispatch.py)


def placement(pattern, moe_layers: int) -> ExpertPlacement:
    return ExpertPlacement(layers=tuple(pattern[i % len(pattern)] for i in range(moe_layers)), num_experts=8)


def rank_batches():
    """Rank 0: 3 rows with left and right padding; rank 1: 2 full rows."""
    g = torch.Generator().manual_seed(60)
    batches = []
    for rows, pads in [(3, {0: (2, 0), 2: (0, 4)}), (2, {})]:
        ids = torch.randint(0, VOCAB, (rows, 12), generator=g)
        mask = torch.ones_like(ids)
        for row, (left, right) in pads.items():
            mask[row, :left] = 0
            mask[row, 12 - right :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@contextlib.contextmanager
def forced_path(path: str):
    """The sparse exchange is the all-to-all, or the gathered one, whatever the payload."""
    saved = dispatch.GATHERED_MAX_BYTES
    dispatch.GATHERED_MAX_BYTES = 0 if path == "all_to_all" else 1 << 40
    try:
        yield
    finally:
        dispatch.GATHERED_MAX_BYTES = saved


def _forwards(path: str, placements: dict, batches) -> dict:
    groups = ParallelGroups.create(ep_size=2)
    inputs = batches[groups.rank]
    sequences = torch.arange(inputs["input_ids"].shape[0]) + 3 * groups.rank
    results = {}
    for name, layout in placements.items():
        teacher = MoETeacher.from_pretrained(path, groups=groups, placement=layout)
        result = {"experts": [list(b.expert_ids) for b in teacher.moe_blocks],
                  "expert_bytes_read": teacher.expert_bytes_read}
        with torch.no_grad():
            for exchange in PATHS:
                with forced_path(exchange):
                    result[exchange] = teacher(**inputs, sequence_index=sequences, routing=NativeTopK()).logits
                    result[f"{exchange}_loads"] = [b.last_load_E.clone() for b in teacher.moe_blocks]
            result["all"] = teacher(**inputs, sequence_index=sequences, routing=AllExperts()).logits
        results[name] = result
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_placed_experts_give_the_single_process_logits(rank_pool2, family):
    path = all_family_checkpoints()[family]
    single = MoETeacher.from_pretrained(path)
    layers = len(single.moe_blocks)
    placements = {"contiguous": None, "shuffled": placement(SHUFFLED, layers),
                  "replicated": placement(REPLICATED, layers)}
    batches = rank_batches()
    per_rank = rank_pool2.run(_forwards, path, placements, batches, timeout_s=300)
    all_inputs = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    real = all_inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = {"native": single(**all_inputs, routing=NativeTopK()).logits,
                    "all": single(**all_inputs, routing=AllExperts()).logits}
    ours = {name: {key: torch.cat([r[name][key] for r in per_rank]) for key in (*PATHS, "all")}
            for name in placements}
    for name, layout in placements.items():
        for exchange in PATHS:
            diff = (ours[name][exchange] - expected["native"])[real].abs().max().item()
            assert diff <= 1e-5, f"{family} {name} {exchange}: {diff}"
            # Every assignment of every real token was computed exactly once, somewhere.
            for layer in range(layers):
                load = sum(int(r[name][f"{exchange}_loads"][layer].sum()) for r in per_rank)
                assert load == int(real.sum()) * single.top_k, f"{family} {name} {exchange} layer {layer}"
        # The dense exchange sums each rank's experts inside one GEMM, so another grouping of the
        # experts rounds differently (as EP 2 against one process does already).
        diff = (ours[name]["all"] - expected["all"])[real].abs().max().item()
        assert diff <= 1e-5, f"{family} {name} all: {diff}"
        if layout is None:
            continue
        for rank, result in enumerate(per_rank):
            assert result[name]["experts"] == [list(slots[rank]) for slots in layout.layers]
        expert_bytes = sum(r[name]["expert_bytes_read"] for r in per_rank)
        if family != "llama_moe":  # uniform widths: bytes in proportion to the slots held
            assert expert_bytes * 8 == single.expert_bytes_read * 2 * layout.slots_per_rank
    # Without replicas each expert computes the same rows in the same order as under the contiguous
    # placement, and a token's experts are summed in ascending order: bit for bit, and so bit for bit
    # the single process wherever EP 2 itself is (Mixtral here). Not so in the gathered exchange at
    # K >= 3, which adds up per-rank partial sums of a token's experts.
    for exchange in PATHS:
        if exchange == "all_to_all" or single.top_k == 2:
            assert torch.equal(ours["shuffled"][exchange], ours["contiguous"][exchange]), f"{family} {exchange}"
    if family == "mixtral":
        assert all(torch.equal(ours["shuffled"][e][real], expected["native"][real]) for e in PATHS)
    # Replicas share their expert's rows: expert 0 of the first MoE layer computed on both ranks
    # (rank 1's primary slot 0, rank 0's extra slot 4).
    loads = [r["replicated"]["all_to_all_loads"][0] for r in per_rank]
    assert int(loads[1][0]) > 0 and int(loads[0][4]) > 0, loads


def _dispatch_with_replicas(tokens_per_rank: list[int], exchange: str) -> tuple[torch.Tensor, torch.Tensor]:
    groups = ParallelGroups.create(ep_size=2)
    w_gate_up_NHJ, w_down_NIH, ranks = dispatch_case(tokens_per_rank)
    slots = REPLICATED[0][groups.ep_rank]
    x_TH, ids_TK, weights_TK = ranks[groups.rank]
    with forced_path(exchange):
        return dispatch.dispatch_sparse(
            x_TH, ids_TK, weights_TK, num_experts=8, ep_size=2, ep_group=groups.ep_group, ep_rank=groups.ep_rank,
            expert_ffn=functools.partial(grouped_swiglu_reference, w_gate_up_EHJ=w_gate_up_NHJ[list(slots)],
                                         w_down_EIH=w_down_NIH[list(slots)]),
            max_tokens=max(tokens_per_rank), slot_map=SlotMap.of(REPLICATED[0], num_experts=8),
        )


def dispatch_case(tokens_per_rank: list[int]):
    """Expert weights, and per rank tokens whose first expert is mostly 0 or 1 (the replicated ones)."""
    g = torch.Generator().manual_seed(5)
    w_gate_up_NHJ, w_down_NIH = random_expert_weights(g, 8, 8, 12)
    ranks = []
    for tokens in tokens_per_rank:
        first = torch.tensor([0, 1, 0, 3])[torch.randint(0, 4, (tokens,), generator=g)]
        second = (first + 1 + torch.randint(0, 7, (tokens,), generator=g)) % 8
        ranks.append((torch.randn(tokens, 8, generator=g), torch.stack([first, second], 1),
                      torch.rand(tokens, 2, generator=g)))
    return w_gate_up_NHJ, w_down_NIH, ranks


@pytest.mark.parametrize("exchange", PATHS)
@pytest.mark.parametrize("tokens_per_rank", [[9, 5], [6, 0]])
def test_dispatch_splits_replicated_experts_between_their_slots(rank_pool2, tokens_per_rank, exchange):
    outputs = rank_pool2.run(_dispatch_with_replicas, tokens_per_rank, exchange)
    w_gate_up_NHJ, w_down_NIH, ranks = dispatch_case(tokens_per_rank)
    for (out_TH, _), (x_TH, ids_TK, weights_TK) in zip(outputs, ranks):
        expected = torch.zeros_like(x_TH)
        for e in range(8):  # ascending expert order, as the dispatch sums
            rows, k = (ids_TK == e).nonzero(as_tuple=True)
            expected[rows] += weights_TK[rows, k, None] * grouped_swiglu_reference(
                x_TH[rows], torch.tensor([len(rows)]), w_gate_up_NHJ[e : e + 1], w_down_NIH[e : e + 1])
        torch.testing.assert_close(out_TH, expected)
    # Loads per slot: rank 0 holds (7, 1, 3, 5, 0), rank 1 (0, 2, 4, 6, 1). A replicated expert's
    # assignments are cut into two halves, equal up to one per source of the cut (each sending rank
    # for the all-to-all, the whole group for the gathered exchange).
    counts = torch.bincount(torch.cat([ids.reshape(-1) for _, ids, _ in ranks]), minlength=8).tolist()
    (r0, r1) = (load.tolist() for _, load in outputs)
    assert [r0[0], r0[2], r0[3], r1[1], r1[2], r1[3]] == [counts[e] for e in (7, 3, 5, 2, 4, 6)]
    for expert, halves in ((0, (r1[0], r0[4])), (1, (r0[1], r1[4]))):
        assert sum(halves) == counts[expert] and abs(halves[0] - halves[1]) <= len(tokens_per_rank)
        assert min(halves) > 0


def _calibrated(path: str, batches, loads_file: str) -> dict:
    groups = ParallelGroups.create(ep_size=2)
    inputs = batches[groups.rank]
    results = {}
    for setting in ("balanced", loads_file):
        teacher = MoETeacher.from_pretrained(path, groups=groups)
        loads = apply_expert_placement(teacher, setting, redundant=1, calibration=[inputs])
        with torch.no_grad():
            logits = teacher(**inputs, routing=NativeTopK()).logits
        results[setting] = {"loads": loads, "placement": teacher.placement, "logits": logits}
    return results


def test_calibration_and_loads_file_agree_on_every_rank(rank_pool2, tmp_path):
    path = all_family_checkpoints()["mixtral"]
    batches = rank_batches()
    single = MoETeacher.from_pretrained(path)
    all_inputs = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    loads = measure_expert_loads(single, [all_inputs], group=None)
    assert int(loads[:, 7].sum()) == 0  # the starved expert: an uneven load to balance
    save_loads(tmp_path / "loads.json", loads)
    per_rank = rank_pool2.run(_calibrated, path, batches, str(tmp_path / "loads.json"), timeout_s=300)
    want = balanced_placement(loads.tolist(), ep_size=2, redundant=1)
    contiguous = contiguous_placement(len(single.moe_blocks), 8, 2)
    assert imbalance(rank_loads(want, loads.tolist())) < imbalance(rank_loads(contiguous, loads.tolist()))
    with torch.no_grad():
        expected = single(**all_inputs, routing=NativeTopK()).logits
    real = all_inputs["attention_mask"].bool()
    for setting in ("balanced", str(tmp_path / "loads.json")):
        for result in per_rank:
            assert torch.equal(result[setting]["loads"], loads)  # summed over both ranks' batches
            assert result[setting]["placement"] == want
        ours = torch.cat([r[setting]["logits"] for r in per_rank])
        assert (ours - expected)[real].abs().max().item() <= 1e-5
