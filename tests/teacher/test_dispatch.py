"""Sparse expert-parallel dispatch against a per-token reference, with uneven and empty ranks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from ds_moekd.kernels import grouped_swiglu_reference
from helpers.references import random_expert_weights

from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.teacher.dispatch import dispatch_sparse

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 8, 12, 8, 2


def make_case(tokens_per_rank: list[int], seed: int):
    """Expert weights and, per rank, tokens with distinct expert ids and weights."""
    g = torch.Generator().manual_seed(seed)
    w_gate_up_NHJ, w_down_NIH = random_expert_weights(g, NUM_EXPERTS, HIDDEN, INTER)
    ranks = []
    for tokens in tokens_per_rank:
        x_TH = torch.randn(tokens, HIDDEN, generator=g)
        ids_TK = (
            torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
            if tokens
            else torch.empty(0, TOP_K, dtype=torch.long)
        )
        ranks.append((x_TH, ids_TK, torch.rand(tokens, TOP_K, generator=g)))
    return w_gate_up_NHJ, w_down_NIH, ranks


def per_token_reference(x_TH, ids_TK, weights_TK, w_gate_up_NHJ, w_down_NIH):
    out_TH = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for e, w in zip(ids_TK[t].tolist(), weights_TK[t].tolist()):
            gate, up = (x_TH[t] @ w_gate_up_NHJ[e]).chunk(2)
            out_TH[t] += w * ((F.silu(gate) * up) @ w_down_NIH[e])
    return out_TH


def _dispatch_on_rank(tokens_per_rank: list[int], seed: int, gathered: bool = False) -> torch.Tensor:
    groups = ParallelGroups.create(ep_size=2)
    w_gate_up_NHJ, w_down_NIH, ranks = make_case(tokens_per_rank, seed)
    local = slice(groups.ep_rank * NUM_EXPERTS // 2, (groups.ep_rank + 1) * NUM_EXPERTS // 2)
    x_TH, ids_TK, weights_TK = ranks[groups.rank]
    out_TH, load_E = dispatch_sparse(
        x_TH,
        ids_TK,
        weights_TK,
        num_experts=NUM_EXPERTS,
        ep_size=2,
        ep_group=groups.ep_group,
        expert_ffn=functools.partial(
            grouped_swiglu_reference, w_gate_up_EHJ=w_gate_up_NHJ[local], w_down_EIH=w_down_NIH[local]
        ),
        ep_rank=groups.ep_rank,
        # EP 2 <= top-2: with the group's largest token count the two-exchange gathered path runs
        max_tokens=max(tokens_per_rank) if gathered else None,
    )
    return out_TH, load_E


def test_single_rank_dispatch_matches_per_token_reference():
    w_gate_up_NHJ, w_down_NIH, [(x_TH, ids_TK, weights_TK)] = make_case([13], seed=0)
    out_TH, load_N = dispatch_sparse(
        x_TH,
        ids_TK,
        weights_TK,
        num_experts=NUM_EXPERTS,
        ep_size=1,
        ep_group=None,
        expert_ffn=functools.partial(
            grouped_swiglu_reference, w_gate_up_EHJ=w_gate_up_NHJ, w_down_EIH=w_down_NIH
        ),
    )
    torch.testing.assert_close(
        out_TH, per_token_reference(x_TH, ids_TK, weights_TK, w_gate_up_NHJ, w_down_NIH)
    )
    assert torch.equal(load_N, torch.bincount(ids_TK.reshape(-1), minlength=NUM_EXPERTS))


@pytest.mark.parametrize("gathered", [False, True], ids=["all_to_all", "gathered"])
@pytest.mark.parametrize("tokens_per_rank", [[7, 3], [5, 0], [0, 0]])
def test_two_rank_dispatch_with_uneven_and_empty_ranks(rank_pool2, tokens_per_rank, gathered):
    outputs = rank_pool2.run(_dispatch_on_rank, tokens_per_rank, seed=1, gathered=gathered)
    w_gate_up_NHJ, w_down_NIH, ranks = make_case(tokens_per_rank, seed=1)
    all_ids = torch.cat([ids_TK.reshape(-1) for _, ids_TK, _ in ranks])
    loads = torch.cat([load_E for _, load_E in outputs])
    assert torch.equal(loads, torch.bincount(all_ids, minlength=NUM_EXPERTS))
    for (out_TH, _), (x_TH, ids_TK, weights_TK) in zip(outputs, ranks):
        assert out_TH.shape == x_TH.shape
        torch.testing.assert_close(
            out_TH, per_token_reference(x_TH, ids_TK, weights_TK, w_gate_up_NHJ, w_down_NIH)
        )
