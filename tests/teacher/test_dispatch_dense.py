"""Dense (all-gather / reduce-scatter) expert-parallel dispatch: ragged ranks, and gradients for SAR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ds_moekd.kernels import dense_swiglu_reference
from helpers.references import random_expert_weights

from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.teacher.dense_dispatch import dispatch_dense

HIDDEN, INTER, NUM_EXPERTS = 8, 6, 4


def make_case(tokens_per_rank: list[int], seed: int):
    """Expert weights; per rank tokens, gate weights with dropped (zero) experts, and an output probe."""
    g = torch.Generator().manual_seed(seed)
    w_gate_up_NHJ, w_down_NIH = random_expert_weights(g, NUM_EXPERTS, HIDDEN, INTER)
    ranks = []
    for tokens in tokens_per_rank:
        gates_TN = torch.rand(tokens, NUM_EXPERTS, generator=g) * (
            torch.rand(tokens, NUM_EXPERTS, generator=g) > 0.3
        )
        probe_TH = torch.randn(tokens, HIDDEN, generator=g)
        ranks.append((torch.randn(tokens, HIDDEN, generator=g), gates_TN, probe_TH))
    return w_gate_up_NHJ, w_down_NIH, ranks


def per_token_reference(x_TH, gates_TN, w_gate_up_NHJ, w_down_NIH):
    out_TH = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for e in range(NUM_EXPERTS):
            gate, up = (x_TH[t] @ w_gate_up_NHJ[e]).chunk(2)
            out_TH[t] = out_TH[t] + gates_TN[t, e] * ((F.silu(gate) * up) @ w_down_NIH[e])
    return out_TH


def _dense_on_rank(tokens_per_rank: list[int], seed: int) -> dict:
    groups = ParallelGroups.create(ep_size=len(tokens_per_rank))
    w_gate_up_NHJ, w_down_NIH, ranks = make_case(tokens_per_rank, seed)
    local = NUM_EXPERTS // groups.ep_size
    experts = slice(groups.ep_rank * local, (groups.ep_rank + 1) * local)
    x_TH, gates_TN, probe_TH = (
        t.clone().requires_grad_(t is not ranks[groups.rank][2]) for t in ranks[groups.rank]
    )
    out_TH, load_E = dispatch_dense(
        x_TH,
        gates_TN,
        ep_size=groups.ep_size,
        ep_rank=groups.ep_rank,
        ep_group=groups.ep_group,
        expert_ffn=lambda x, g: dense_swiglu_reference(x, g, w_gate_up_NHJ[experts], w_down_NIH[experts]),
    )
    (out_TH * probe_TH).sum().backward()  # collective backward: every rank takes part
    return {"out": out_TH.detach(), "grad_x": x_TH.grad, "grad_gates": gates_TN.grad, "load": load_E}


@pytest.mark.parametrize("tokens_per_rank", [[7, 3], [5, 0], [0, 4]])
def test_two_rank_dense_dispatch_and_its_gradients(rank_pool2, tokens_per_rank):
    results = rank_pool2.run(_dense_on_rank, tokens_per_rank, seed=3)
    w_gate_up_NHJ, w_down_NIH, ranks = make_case(tokens_per_rank, seed=3)
    for result, (x_TH, gates_TN, probe_TH) in zip(results, ranks):
        x_TH, gates_TN = x_TH.clone().requires_grad_(), gates_TN.clone().requires_grad_()
        expected_TH = per_token_reference(x_TH, gates_TN, w_gate_up_NHJ, w_down_NIH)
        torch.testing.assert_close(result["out"], expected_TH.detach())
        if x_TH.shape[0] == 0:
            continue
        (expected_TH * probe_TH).sum().backward()
        torch.testing.assert_close(result["grad_x"], x_TH.grad)
        torch.testing.assert_close(result["grad_gates"], gates_TN.grad)
    # Each rank computed its two experts for every token of both ranks with a nonzero weight.
    all_gates_TN = torch.cat([gates for _, gates, _ in ranks])
    load_N = torch.cat([r["load"] for r in results])
    assert load_N.tolist() == (all_gates_TN != 0).sum(0).tolist()


def test_single_rank_dense_dispatch():
    w_gate_up_NHJ, w_down_NIH, [(x_TH, gates_TN, _)] = make_case([6], seed=4)
    out_TH, load_N = dispatch_dense(
        x_TH,
        gates_TN,
        ep_size=1,
        ep_rank=0,
        ep_group=None,
        expert_ffn=lambda x, g: dense_swiglu_reference(x, g, w_gate_up_NHJ, w_down_NIH),
    )
    torch.testing.assert_close(out_TH, per_token_reference(x_TH, gates_TN, w_gate_up_NHJ, w_down_NIH))
    assert load_N.tolist() == (gates_TN != 0).sum(0).tolist()
