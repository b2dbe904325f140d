"""Expert placement by measured load (ds_moekd/teacher/placement.py) on hand-computed examples, and a
one-process teacher in a placement (2-rank behaviour: test_placement_ep.py)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.tiny_moe_checkpoints import VOCAB, all_family_checkpoints

from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.calibration import apply_expert_placement
from ds_moekd.teacher.placement import (
    ExpertPlacement,
    SlotMap,
    balanced_placement,
    contiguous_placement,
    imbalance,
    rank_loads,
    read_loads,
    save_loads,
)
from ds_moekd.teacher.routing import AllExperts


def test_contiguous_placement_is_blocks_of_n_over_e():
    placement = contiguous_placement(num_layers=2, num_experts=8, ep_size=4)
    assert placement.layers == (((0, 1), (2, 3), (4, 5), (6, 7)),) * 2
    assert (placement.ep_size, placement.slots_per_rank, placement.redundant) == (4, 2, 0)


def test_packing_balances_what_contiguous_blocks_do_not():
    # Contiguous: rank 0 gets 9+8+7+6 = 30, rank 1 four experts of 1. Heaviest first onto the
    # lightest rank: 9->r0, 8->r1, 7->r1, 6->r0, then the 1s alternate: 17 and 17.
    loads = [[9, 8, 7, 6, 1, 1, 1, 1]]
    placement = balanced_placement(loads, ep_size=2)
    assert placement.layers == (((0, 3, 4, 6), (1, 2, 5, 7)),)
    assert rank_loads(placement, loads) == [[17.0, 17.0]]
    assert rank_loads(contiguous_placement(1, 8, 2), loads) == [[30.0, 4.0]]
    assert imbalance(rank_loads(placement, loads)) == 1.0
    assert imbalance(rank_loads(contiguous_placement(1, 8, 2), loads)) == pytest.approx(30 / 17)


def test_a_hot_expert_gets_a_replica():
    # Expert 0 draws 40 of 75: no packing of whole experts beats contiguous (55 vs 20), so the
    # primaries stay contiguous. The first extra slot (lightest rank, 1) takes expert 0's replica:
    # 35 / 40. The second (rank 0, the only free one) takes expert 4 from rank 1: 37.5 / 37.5.
    loads = [[40, 5, 5, 5, 5, 5, 5, 5]]
    assert balanced_placement(loads, ep_size=2).layers == contiguous_placement(1, 8, 2).layers
    placement = balanced_placement(loads, ep_size=2, redundant=1)
    assert placement.layers == (((0, 1, 2, 3, 4), (4, 5, 6, 7, 0)),)
    assert placement.redundant == 1
    assert rank_loads(placement, loads) == [[37.5, 37.5]]


def test_each_layer_is_packed_by_its_own_loads():
    loads = [[9, 8, 7, 6, 1, 1, 1, 1], [1, 1, 1, 1, 6, 7, 8, 9]]
    layers = balanced_placement(loads, ep_size=2).layers
    assert layers[0] == ((0, 3, 4, 6), (1, 2, 5, 7))
    assert layers[1] == ((0, 2, 4, 7), (1, 3, 5, 6))  # the same packing, heaviest (expert 7) first
    assert [max(r) for r in rank_loads(balanced_placement(loads, 2), loads)] == [17.0, 17.0]


@pytest.mark.parametrize("seed", range(20))
def test_random_loads_give_a_valid_placement_never_worse_than_contiguous(seed):
    rng = random.Random(seed)
    ep_size, num_experts = rng.choice([(2, 8), (4, 8), (4, 16), (8, 64)])
    loads = [[rng.expovariate(1.0) * rng.choice([1, 1, 10]) for _ in range(num_experts)] for _ in range(3)]
    redundant = rng.choice([0, 1, 2])
    placement = balanced_placement(loads, ep_size, redundant)  # the constructor checks the invariants
    assert placement.slots_per_rank == num_experts // ep_size + redundant
    contiguous = rank_loads(contiguous_placement(3, num_experts, ep_size), loads)
    packed = rank_loads(balanced_placement(loads, ep_size), loads)
    assert all(max(p) <= max(c) for p, c in zip(packed, contiguous))
    for layer, ranks in zip(loads, rank_loads(placement, loads)):
        assert sum(ranks) == pytest.approx(sum(layer))  # every assignment counted once


@pytest.mark.parametrize(
    "layers, message",
    [
        ((((0, 1, 2), (3, 4, 5, 6)),), "equal slots per rank"),
        ((((0, 1, 2, 2), (4, 5, 6, 7)),), "every expert exactly once"),
        ((((0, 1, 2, 3, 4), (4, 5, 6, 7, 4)),), "at most once"),
        ((((0, 1, 2, 3, 4, 4), (4, 5, 6, 7, 0, 1)),), "at most once"),
    ],
)
def test_invalid_placements_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(layers=layers, num_experts=8)


def test_too_many_redundant_slots_are_refused():
    with pytest.raises(ValueError, match="at most 4"):
        balanced_placement([[1] * 8], ep_size=2, redundant=5)


def test_slot_map_splits_a_replicated_experts_run_evenly():
    # Rank 0 holds 0..4, rank 1 holds 4..7 and 0: expert 0 in global slots 0 and 9, expert 4 in 4 and 5.
    slot_map = SlotMap.of(((0, 1, 2, 3, 4), (4, 5, 6, 7, 0)), num_experts=8)
    assert not slot_map.in_expert_order
    sorted_ids = torch.tensor([0, 0, 0, 1, 4, 4, 4, 4, 4, 7])
    assert slot_map.slots_of(sorted_ids).tolist() == [0, 0, 9, 1, 4, 4, 4, 5, 5, 8]


def test_contiguous_slot_map_is_the_identity():
    slot_map = SlotMap.of(contiguous_placement(1, 8, 2).layers[0], num_experts=8)
    assert slot_map.in_expert_order
    ids = torch.tensor([0, 2, 2, 5, 7])
    assert torch.equal(slot_map.slots_of(ids), ids)
    shuffled = SlotMap.of(((1, 3, 5, 7), (0, 2, 4, 6)), num_experts=8)
    assert not shuffled.in_expert_order
    assert shuffled.slots_of(ids).tolist() == [4, 5, 5, 2, 3]


def test_loads_file_round_trip(tmp_path):
    loads = torch.tensor([[3, 0, 1, 2], [0, 0, 5, 1]])
    save_loads(tmp_path / "loads.json", loads)
    assert read_loads(tmp_path / "loads.json") == loads.tolist()
    (tmp_path / "bad.json").write_text('{"loads": [[1, 2], [3]]}')
    with pytest.raises(ValueError, match="per MoE layer"):
        read_loads(tmp_path / "bad.json")


def test_one_process_teacher_with_permuted_slots_gives_the_same_logits():
    """At EP 1 a placement only orders the slots: the sparse path maps experts to them and back
    (bit for bit), the dense path takes their gate columns in slot order (one GEMM's sum order)."""
    path = all_family_checkpoints()["mixtral"]
    default = MoETeacher.from_pretrained(path)
    layers = len(default.moe_blocks)
    permuted = ExpertPlacement(layers=(((7, 0, 5, 1, 2, 6, 3, 4),),) * layers, num_experts=8)
    teacher = MoETeacher.from_pretrained(path, placement=permuted)
    assert teacher.placement == permuted and teacher.local_expert_ids == [7, 0, 5, 1, 2, 6, 3, 4]
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, default(ids).logits)
        torch.testing.assert_close(teacher(ids, routing=AllExperts()).logits, default(ids, routing=AllExperts()).logits)


def test_nothing_to_place_in_one_process_and_mismatched_placements_are_refused():
    teacher = MoETeacher.from_pretrained(all_family_checkpoints()["mixtral"])
    layers = len(teacher.moe_blocks)
    assert apply_expert_placement(teacher, "balanced", calibration=[]) is None
    assert teacher.placement == contiguous_placement(layers, 8, 1)
    with pytest.raises(ValueError, match=f"placement for {layers + 1} MoE layers"):
        teacher.place_experts(contiguous_placement(layers + 1, 8, 1))
    with pytest.raises(ValueError, match="over 2 ranks"):
        MoETeacher.from_pretrained(all_family_checkpoints()["mixtral"], placement=contiguous_placement(layers, 8, 2))
