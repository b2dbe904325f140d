"""Expert parallelism at EP 2 and 4 against the single process on the concatenated batch.

Every rank has its own batch (different sizes and padding, one rank's batch is a single row),
sequence indices are global (rank offsets), so NativeTopK, AllExperts, KASample and generation
must give each rank exactly what one process gives those rows. Each rank must read only its
N/EP experts of every layer.
"""

from __future__ import annotations

import pytest
import torch
from helpers.teacher_decoding import teacher_generate
from helpers.tiny_moe_checkpoints import STARVED_EXPERT, VOCAB, all_family_checkpoints

from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK

SEQ = 8
POLICIES = {
    "native": NativeTopK(),
    "all": AllExperts(),
    "ka": KASample(resample_prob=0.5, seed=3, step=7),
}
FAMILIES_EP2 = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "deepseek_v2",
    "llama_moe",
    "mixtral_fused_sharded",
]
FAMILIES_EP4 = ["mixtral", "deepseek_v3", "llama_moe"]


def rank_batches(world: int):
    """Uneven per-rank batches of one length: 3, 1, 2, 2 rows with left/right padding."""
    g = torch.Generator().manual_seed(30 + world)
    batches = []
    for rows, pads in [(3, {1: (0, 3), 2: (4, 0)}), (1, {}), (2, {0: (2, 0)}), (2, {1: (0, 5)})][:world]:
        ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
        mask = torch.ones_like(ids)
        for row, (left, right) in pads.items():
            mask[row, :left] = 0
            mask[row, SEQ - right :] = 0
        batches.append((ids, mask))
    return batches


def sequence_offsets(batches) -> list[int]:
    sizes = [ids.shape[0] for ids, _ in batches]
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _ep_forwards(paths: dict[str, str], families: list[str], ep_size: int, batches) -> dict:
    groups = ParallelGroups.create(ep_size=ep_size)
    ids, mask = batches[groups.rank]
    sequences = torch.arange(ids.shape[0]) + sequence_offsets(batches)[groups.rank]
    results = {}
    for family in families:
        teacher = MoETeacher.from_pretrained(paths[family], groups=groups)
        logits, loads = {}, {}
        with torch.no_grad():
            for name, policy in POLICIES.items():
                logits[name] = teacher(ids, mask, routing=policy, sequence_index=sequences).logits
                loads[name] = [block.last_load_E.clone() for block in teacher.moe_blocks]
        results[family] = {
            "logits": logits,
            "loads": loads,
            "local_expert_ids": teacher.local_expert_ids,
            "bytes_read": teacher.bytes_read,
            "expert_bytes_read": teacher.expert_bytes_read,
        }
    return results


def check_against_single_process(results, families, batches, ep_size):
    offsets = sequence_offsets(batches)
    all_ids = torch.cat([ids for ids, _ in batches])
    all_mask = torch.cat([mask for _, mask in batches])
    for family in families:
        single = MoETeacher.from_pretrained(all_family_checkpoints()[family])
        local = single.num_experts // ep_size
        for name, policy in POLICIES.items():
            with torch.no_grad():
                expected = single(all_ids, all_mask, routing=policy).logits
            for rank, ((ids, mask), result) in enumerate(zip(batches, results)):
                ours = result[family]["logits"][name]
                rows = slice(offsets[rank], offsets[rank] + ids.shape[0])
                diff = (ours - expected[rows])[mask.bool()].abs().max().item()
                assert diff <= 1e-5, f"{family} {name} rank {rank}: {diff}"
            # Every assignment of every real token was computed once, somewhere; padding never.
            for layer in range(len(single.moe_blocks)):
                load_N = torch.cat([r[family]["loads"][name][layer] for r in results])
                per_token = {"native": single.top_k, "all": single.num_experts, "ka": single.num_experts - 1}[
                    name
                ]
                assert int(load_N.sum()) == int(all_mask.sum()) * per_token, f"{family} {name} layer {layer}"
        non_expert = single.bytes_read - single.expert_bytes_read
        for rank, result in enumerate(results):
            r = result[family]
            assert r["local_expert_ids"] == list(range(rank % ep_size * local, (rank % ep_size + 1) * local))
            assert r["bytes_read"] - r["expert_bytes_read"] == non_expert, f"{family} rank {rank}"
        # The EP group's ranks together read each expert byte exactly once.
        assert sum(r[family]["expert_bytes_read"] for r in results[:ep_size]) == single.expert_bytes_read
        if family != "llama_moe":  # uniform widths: an equal share per rank
            assert all(r[family]["expert_bytes_read"] * ep_size == single.expert_bytes_read for r in results)


def test_two_expert_parallel_ranks_match_single_process(rank_pool2):
    batches = rank_batches(2)
    results = rank_pool2.run(_ep_forwards, all_family_checkpoints(), FAMILIES_EP2, 2, batches, timeout_s=300)
    check_against_single_process(results, FAMILIES_EP2, batches, ep_size=2)
    # Mixtral's starved expert (rank 1's last) computed nothing under native routing.
    assert all(int(load[-1]) == 0 for load in results[1]["mixtral"]["loads"]["native"])
    assert STARVED_EXPERT == 7


def test_four_expert_parallel_ranks_match_single_process(rank_pool4):
    batches = rank_batches(4)
    results = rank_pool4.run(_ep_forwards, all_family_checkpoints(), FAMILIES_EP4, 4, batches, timeout_s=300)
    check_against_single_process(results, FAMILIES_EP4, batches, ep_size=4)


# --- generation ------------------------------------------------------------------------------------

GENERATION = [
    {"routing": NativeTopK(), "do_sample": False},
    {"routing": KASample(resample_prob=0.5, seed=1), "do_sample": True, "seed": 4},
]


def generation_prompts(world: int):
    """Left-padded prompts; rank r decodes 3 + 2r new tokens, so ranks finish at different steps."""
    g = torch.Generator().manual_seed(40)
    prompts = []
    for rank in range(world):
        ids = torch.randint(3, VOCAB, (2 if rank % 2 == 0 else 1, 5), generator=g)
        mask = torch.ones_like(ids)
        ids[-1, :rank], mask[-1, :rank] = 0, 0
        prompts.append((ids, mask, 3 + 2 * rank))
    return prompts


def _ep_generate(path: str, ep_size: int, prompts) -> list[torch.Tensor]:
    groups = ParallelGroups.create(ep_size=ep_size)
    teacher = MoETeacher.from_pretrained(path, groups=groups)
    ids, mask, new_tokens = prompts[groups.rank]
    sequences = torch.arange(ids.shape[0]) + 10 * groups.rank
    return [
        teacher_generate(teacher, ids, mask, max_new_tokens=new_tokens, pad_token_id=0, sequence_index=sequences, **kw)
        for kw in GENERATION
    ]


@pytest.mark.parametrize("family", ["deepseek_v3", "llama_moe"])
def test_expert_parallel_generation_equals_single_process(rank_pool2, family):
    prompts = generation_prompts(2)
    results = rank_pool2.run(_ep_generate, all_family_checkpoints()[family], 2, prompts, timeout_s=300)
    single = MoETeacher.from_pretrained(all_family_checkpoints()[family])
    for rank, ((ids, mask, new_tokens), outputs) in enumerate(zip(prompts, results)):
        for kw, ours in zip(GENERATION, outputs):
            expected = teacher_generate(
                single,
                ids,
                mask,
                max_new_tokens=new_tokens,
                pad_token_id=0,
                sequence_index=torch.arange(ids.shape[0]) + 10 * rank,
                **kw,
            )
            assert ours.shape == (ids.shape[0], ids.shape[1] + new_tokens)
            assert torch.equal(ours, expected), f"rank {rank} {kw}"


def _ep_size_error(ep_size: int) -> str:
    try:
        ParallelGroups.create(ep_size=ep_size)
    except ValueError as error:
        return str(error)
    return "no error"


def test_ep_size_must_divide_world_size(rank_pool4):
    messages = rank_pool4.run(_ep_size_error, 3)
    assert all("teacher.ep_size=3 must divide the world size 4" in m for m in messages)


# --- SAR: router gradients through the dense dispatch ----------------------------------------------


def router_gradients(teacher: MoETeacher, ids, mask, probe_BSV) -> list[torch.Tensor]:
    """d(sum(logits * probe)) / d(gate network weights) of every MoE layer under AllExperts
    (LLaMA-MoE's noise weights only act in train mode)."""
    routers = [p for block in teacher.moe_blocks for p in block.gate.gate_network.parameters()]
    for p in routers:
        p.requires_grad_(True)
    logits = teacher(ids, mask, routing=AllExperts()).logits
    (logits * probe_BSV * mask[..., None]).sum().backward()
    return [p.grad.clone() for p in routers]


def _ep_router_gradients(path: str, batches, probes) -> list[torch.Tensor]:
    groups = ParallelGroups.create(ep_size=2)
    teacher = MoETeacher.from_pretrained(path, groups=groups)
    ids, mask = batches[groups.rank]
    return router_gradients(teacher, ids, mask, probes[groups.rank])


def test_router_gradients_under_expert_parallelism_equal_single_process(rank_pool2):
    """The replicated routers' gradient, summed over the EP ranks (SAR all-reduces it), equals the
    single process's on the concatenated batch: gradients flow through both dense collectives."""
    path = all_family_checkpoints()["llama_moe"]
    batches = rank_batches(2)
    g = torch.Generator().manual_seed(50)
    probes = [torch.randn(*ids.shape, VOCAB, generator=g) for ids, _ in batches]
    per_rank = rank_pool2.run(_ep_router_gradients, path, batches, probes, timeout_s=300)
    single = MoETeacher.from_pretrained(path)
    expected = router_gradients(
        single, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), torch.cat(probes)
    )
    assert len(expected) == 2 * len(single.moe_blocks)  # gate_network.0 and .2 of each layer
    for grad0, grad1, want in zip(*per_rank, expected):
        assert want.abs().max() > 0
        torch.testing.assert_close(grad0 + grad1, want, atol=1e-5, rtol=1e-4)
