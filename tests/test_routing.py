"""Native top-k routing applies the family's weighting rule to the top-k experts."""

from __future__ import annotations

import torch

from ds_moekd.routing import NativeTopK, RouterSpec, RoutingContext


def _route(renormalize: bool):
    logits_TN = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 2.5]])
    context = RoutingContext(
        layer_index=0, sequence_T=torch.zeros(2, dtype=torch.long), position_T=torch.arange(2)
    )
    router = RouterSpec(num_experts=4, top_k=2, renormalize=renormalize)
    return logits_TN, NativeTopK().route(logits_TN, router, context)


def test_renormalised_weights_are_softmax_over_chosen_logits():  # Mixtral's rule
    logits_TN, (ids_TK, weights_TK) = _route(renormalize=True)
    assert ids_TK.tolist() == [[0, 2], [1, 3]]
    torch.testing.assert_close(weights_TK, torch.softmax(logits_TN.gather(1, ids_TK), dim=-1))


def test_unnormalised_weights_are_full_softmax_probabilities():  # Qwen/OLMoE without norm_topk_prob
    logits_TN, (ids_TK, weights_TK) = _route(renormalize=False)
    torch.testing.assert_close(weights_TK, torch.softmax(logits_TN, dim=-1).gather(1, ids_TK))
    assert (weights_TK.sum(dim=-1) < 1).all()
