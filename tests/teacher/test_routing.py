"""Routing policies: each applies the family's weighting rule; KA samples exactly and reproducibly."""

from __future__ import annotations

import itertools

import pytest
import torch

from ds_moekd.runtime.rng import counter_uniform
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK, RouterSpec, RoutingContext


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


# --- AllExperts, DeepSeek flavour, KA sampling ------------------------------------------------


SIGMOID = RouterSpec(num_experts=4, top_k=1, renormalize=True, scoring="sigmoid", scaling_factor=2.5)


def _context(tokens: int, *, sequence: int = 0, layer: int = 0) -> RoutingContext:
    return RoutingContext(layer, torch.full((tokens,), sequence), torch.arange(tokens))


def test_all_experts_use_the_family_weights_over_all_experts():
    logits_TN = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    ids_TK, weights_TK = AllExperts().route(logits_TN, RouterSpec(4, 2, renormalize=False), _context(5))
    assert ids_TK.tolist() == [[0, 1, 2, 3]] * 5
    torch.testing.assert_close(weights_TK, torch.softmax(logits_TN, dim=-1))
    _, weights_TK = AllExperts().route(logits_TN, SIGMOID, _context(5))
    sig_TN = torch.sigmoid(logits_TN)
    torch.testing.assert_close(weights_TK, 2.5 * sig_TN / sig_TN.sum(-1, keepdim=True))


def test_ka_without_resampling_is_the_family_top_k_with_its_weights():
    logits_TN = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    ids_TK, weights_TK = KASample(resample_prob=0.0).route(
        logits_TN, RouterSpec(4, 2, renormalize=True), _context(1)
    )
    assert ids_TK.tolist() == [[0, 2, 1]]  # N-1 = 3 experts
    torch.testing.assert_close(weights_TK, torch.softmax(logits_TN[:, [0, 2, 1]], dim=-1))


def _exact_dropped_distribution(p_N: list[float]) -> list[float]:
    """P(expert j is the one left out) when N-1 experts are drawn one by one without replacement."""
    dropped = [0.0] * len(p_N)
    for order in itertools.permutations(range(len(p_N))):
        prob, left = 1.0, 1.0
        for e in order[:-1]:
            prob *= p_N[e] / left
            left -= p_N[e]
        dropped[order[-1]] += prob
    return dropped


@pytest.mark.parametrize("router", [RouterSpec(4, 1, renormalize=True), SIGMOID], ids=["softmax", "sigmoid"])
def test_ka_resampling_matches_sampling_without_replacement(router):
    tokens = 20000
    logits_TN = torch.tensor([[1.2, 0.3, -0.4, 0.0]]).expand(tokens, 4)
    ids_TK, _ = KASample(resample_prob=1.0, seed=5).route(logits_TN, router, _context(tokens))
    assert all(len(set(row)) == 3 for row in ids_TK[:200].tolist())  # without replacement
    dropped_T = 6 - ids_TK.sum(dim=-1)  # 0+1+2+3 minus the chosen three
    observed_N = torch.bincount(dropped_T, minlength=4).double()
    expected_N = (
        torch.tensor(_exact_dropped_distribution(router.probabilities(logits_TN[:1])[0].tolist())) * tokens
    )
    chi_square = float(((observed_N - expected_N) ** 2 / expected_N).sum())
    assert chi_square < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_ka_resamples_a_resample_prob_fraction_of_tokens():
    tokens, prob = 20000, 0.25
    logits_TN = torch.zeros(tokens, 4)  # uniform: a sampled set equals the top set 1/4 of the time
    router = RouterSpec(4, 1, renormalize=True)
    top_TK, _ = KASample(resample_prob=0.0).route(logits_TN, router, _context(tokens))
    ids_TK, _ = KASample(resample_prob=prob, seed=1).route(logits_TN, router, _context(tokens))
    changed = (ids_TK.sort(-1).values != top_TK.sort(-1).values).any(-1).double().mean().item()
    expected = prob * 0.75
    assert abs(changed - expected) < 4 * (expected * (1 - expected) / tokens) ** 0.5


def test_counter_draws_are_pure_functions_of_their_keys():
    base = RoutingContext(
        2, torch.tensor([0, 7, 7, 3]), torch.tensor([5, 5, 6, 0]), torch.tensor([0, 1, 0, 0])
    )
    u_TS = counter_uniform(9, 4, base, streams=5)
    # The same keys in another batch (reordered, with other tokens) give the same numbers.
    other = RoutingContext(2, torch.tensor([1, 3, 7]), torch.tensor([2, 0, 5]), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(counter_uniform(9, 4, other, streams=5)[1:], u_TS[[3, 1]], rtol=0, atol=0)
    assert ((u_TS > 0) & (u_TS < 1)).all()
    # Every key part matters.
    for seed, step, layer in ((10, 4, 2), (9, 5, 2), (9, 4, 3)):
        changed = RoutingContext(layer, base.sequence_T, base.position_T, base.draw_T)
        assert not torch.equal(counter_uniform(seed, step, changed, streams=5), u_TS)
    assert len(set(u_TS.reshape(-1).tolist())) == u_TS.numel()


def test_sampling_cuts_to_top_k_and_the_top_p_nucleus():
    from ds_moekd.runtime.rng import Sampling, sample_tokens

    logits_V = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    keys = torch.arange(4000)
    positions = torch.zeros_like(keys)

    def draw(**cut):
        return sample_tokens(logits_V.expand(len(keys), -1), Sampling(**cut), seed=3, step=1, keys_B=keys,
                             positions_B=positions)

    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.65).tolist()) == {0, 1}  # 0.4 + 0.3 reaches 0.65
    assert set(draw(top_p=0.75).tolist()) == {0, 1, 2}
    full = torch.bincount(draw(), minlength=5).double() / len(keys)
    assert set(draw().tolist()) == set(range(5)) and abs(full[3].item() - 0.06) < 0.02
    two = torch.bincount(draw(top_k=2), minlength=5).double() / len(keys)
    assert abs(two[0].item() - 0.4 / 0.7) < 0.03  # renormalised over the kept tokens
    assert torch.equal(draw(temperature=1e-4), torch.zeros_like(keys))  # near-greedy
