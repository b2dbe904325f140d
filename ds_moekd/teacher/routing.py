"""Routing policies: the one place that decides which experts a token uses and with what weight.

A policy turns one MoE layer's gate logits `[T, N]` into expert ids `[T, K]` and weights `[T, K]`.
The family's router flavour (`RouterSpec`) says how logits become scores, how the family picks
its top-k (correction bias, group limits) and how a chosen set of experts is weighted; a policy
only chooses the set. So every policy applies the family's own weighting rule to its chosen
experts: KA with λ=0 and K=N-1 is exactly the family's own top-(N-1) forward, and all-expert
routing uses the original router weights (docs/methods/ka.md, docs/methods/all.md).

Policies see a `RoutingContext` per layer call: the layer index and, per token, its global
sequence index, position and draw index. Native top-k ignores it; KA derives each token's random
draw from it with a counter-based hash (ds_moekd/runtime/rng.py), so draws do not depend on batching,
padding, EP size or the order of draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ds_moekd.runtime.rng import CounterKey, counter_uniform, gumbel


@dataclass(frozen=True)
class RouterSpec:
    """A family's router flavour.

    softmax (Mixtral, Qwen, OLMoE, LLaMA-MoE, DeepSeek-V2) or sigmoid (DeepSeek-V3) scores; the
    native top-k may add a per-layer correction bias for the choice only and may be limited to the
    best `topk_groups` of `num_groups` expert groups; the chosen experts' scores are optionally
    renormalised to sum 1, then multiplied by `scaling_factor`.
    """

    num_experts: int
    top_k: int
    # Weights of the chosen experts are renormalised to sum to 1 (Mixtral, LLaMA-MoE; Qwen/OLMoE/
    # DeepSeek-V3 only with norm_topk_prob). Without it they are the plain scores.
    renormalize: bool
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    scaling_factor: float = 1.0  # routed_scaling_factor (DeepSeek), score_scale_factor (LLaMA-MoE)
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"  # DeepSeek-V3: sum of a group's best two; DeepSeek-V2: "max"
    # DeepSeek-V3's per-layer e_score_correction_bias `[N]`: shifts the choice, never the weights.
    correction_bias_N: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"RouterSpec.scoring={self.scoring!r}; expected 'softmax' or 'sigmoid'")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"RouterSpec: top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")

    def scores(self, logits_TN: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the model dtype, as transformers' routers do.
        if self.scoring == "sigmoid":
            return torch.sigmoid(logits_TN.float())
        return torch.softmax(logits_TN.float(), dim=-1)

    def probabilities(self, logits_TN: torch.Tensor) -> torch.Tensor:
        """The router's distribution over experts (what KA samples from; sigmoid scores normalised)."""
        scores_TN = self.scores(logits_TN)
        if self.scoring == "softmax":
            return scores_TN
        return scores_TN / scores_TN.sum(dim=-1, keepdim=True)

    def select_top(self, scores_TN: torch.Tensor, k: int, *, group_limited: bool) -> torch.Tensor:
        """The family's own top-`k` choice `[T, k]` (correction bias; group limits if asked)."""
        choice_TN = (
            scores_TN if self.correction_bias_N is None else scores_TN + self.correction_bias_N.float()
        )
        if group_limited and self.topk_groups < self.num_groups:
            choice_TN = self._mask_groups(choice_TN)
        return torch.topk(choice_TN, k, dim=-1).indices

    def _mask_groups(self, choice_TN: torch.Tensor) -> torch.Tensor:
        grouped_TGn = choice_TN.view(choice_TN.shape[0], self.num_groups, -1)
        if self.group_score == "max":
            group_TG = grouped_TGn.max(dim=-1).values
        else:
            group_TG = grouped_TGn.topk(2, dim=-1).values.sum(dim=-1)
        best_Tg = torch.topk(group_TG, self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, best_Tg, True)
        keep_TN = keep_TG[:, :, None].expand_as(grouped_TGn).reshape_as(choice_TN)
        return choice_TN.masked_fill(~keep_TN, float("-inf"))

    def weights(self, scores_TN: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        """The family's weighting rule applied to a chosen expert set (fp32 `[T, K]`)."""
        weights_TK = scores_TN.gather(-1, expert_ids_TK)
        if self.renormalize:
            # DeepSeek-V3 guards the sigmoid sum with 1e-20; a softmax sum is never 0.
            eps = 1e-20 if self.scoring == "sigmoid" else 0.0
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + eps)
        if self.scaling_factor != 1.0:
            weights_TK = weights_TK * self.scaling_factor
        return weights_TK

    def for_layer(self, correction_bias_N: torch.Tensor | None) -> RouterSpec:
        return (
            self
            if correction_bias_N is None
            else dataclasses.replace(self, correction_bias_N=correction_bias_N)
        )


# A layer call's per-token keys: the layer index and each token's sequence, position and draw.
RoutingContext = CounterKey


class RoutingPolicy(Protocol):
    def route(
        self, logits_TN: torch.Tensor, router: RouterSpec, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (expert ids `[T, K]` int64, weights `[T, K]` fp32)."""
        ...

    def experts_per_token(self, num_experts: int, top_k: int) -> int:
        """K, for a layer of `num_experts` whose native routing takes `top_k`."""
        ...

    def at_step(self, step: int) -> RoutingPolicy:
        """The policy whose random draws are keyed by training step `step`."""
        ...


def experts_per_token(policy: RoutingPolicy | None, num_experts: int, top_k: int) -> int:
    """Experts each token runs under `policy` (None: the family's native top-k)."""
    return top_k if policy is None else policy.experts_per_token(num_experts, top_k)


@dataclass(frozen=True)
class NativeTopK:
    """The family's own routing: its top-k experts (bias, group limits), family weighting."""

    def experts_per_token(self, num_experts: int, top_k: int) -> int:
        return top_k

    def at_step(self, step: int) -> NativeTopK:
        return self

    def route(
        self, logits_TN: torch.Tensor, router: RouterSpec, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores_TN = router.scores(logits_TN)
        expert_ids_TK = router.select_top(scores_TN, router.top_k, group_limited=True)
        return expert_ids_TK, router.weights(scores_TN, expert_ids_TK)


@dataclass(frozen=True)
class AllExperts:
    """Every token uses all N experts, weighted by the family's rule over the full set."""

    def experts_per_token(self, num_experts: int, top_k: int) -> int:
        return num_experts

    def at_step(self, step: int) -> AllExperts:
        return self

    def route(
        self, logits_TN: torch.Tensor, router: RouterSpec, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores_TN = router.scores(logits_TN)
        expert_ids_TK = torch.arange(router.num_experts, device=logits_TN.device).expand_as(scores_TN)
        return expert_ids_TK, router.weights(scores_TN, expert_ids_TK)


@dataclass(frozen=True)
class KASample:
    """Knowledge Augmentation (docs/methods/ka.md): per token and layer, K experts (default N-1).

    With probability `resample_prob` the K experts are drawn without replacement from the router's
    probabilities (Gumbel-top-K, which is exactly sequential sampling without replacement),
    otherwise they are the family's top-K; group limits are ignored either way. The draw is a pure
    function of (seed, step, draw, layer, sequence, position): set `step` per training step
    (`at_step`), and give each of the M batched draws its own draw index (`MoETeacher.forward`'s
    `draw_index`, or `MoETeacher.forward_draws`).
    """

    resample_prob: float = 0.05
    num_selected: int | None = None
    seed: int = 0
    step: int = 0

    def __post_init__(self):
        if not 0.0 <= self.resample_prob <= 1.0:
            raise ValueError(f"KASample.resample_prob={self.resample_prob} must be in [0, 1]")

    def at_step(self, step: int) -> KASample:
        return dataclasses.replace(self, step=step)

    def experts_per_token(self, num_experts: int, top_k: int) -> int:
        return num_experts - 1 if self.num_selected is None else self.num_selected

    def route(
        self, logits_TN: torch.Tensor, router: RouterSpec, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_experts = router.num_experts
        k = self.experts_per_token(num_experts, router.top_k)
        if not 1 <= k <= num_experts:
            raise ValueError(
                f"KASample.num_selected={self.num_selected} must be in [1, {num_experts}] experts"
            )
        scores_TN = router.scores(logits_TN)
        top_TK = router.select_top(scores_TN, k, group_limited=False)
        if self.resample_prob == 0.0:
            return top_TK, router.weights(scores_TN, top_TK)
        # Stream 0: the resample coin; streams 1..N: one Gumbel per expert, drawn only for the
        # tokens whose coin says resample (same values as drawing them for every token).
        coin_T = counter_uniform(self.seed, self.step, context, streams=1)[:, 0]
        resample_T = coin_T < self.resample_prob
        expert_ids_TK = top_TK.clone()
        rows_R = resample_T.nonzero()[:, 0]
        if rows_R.numel():
            subset = CounterKey(
                context.layer_index,
                context.sequence_T[rows_R],
                context.position_T[rows_R],
                None if context.draw_T is None else context.draw_T[rows_R],
            )
            gumbel_RN = gumbel(counter_uniform(self.seed, self.step, subset, streams=num_experts, first_stream=1))
            log_p_RN = torch.log(router.probabilities(logits_TN[rows_R]).double())
            expert_ids_TK[rows_R] = torch.topk(log_p_RN + gumbel_RN, k, dim=-1).indices
        return expert_ids_TK, router.weights(scores_TN, expert_ids_TK)
