"""Routing policies: the one place that decides which experts a token uses and with what weight.

A policy turns one MoE layer's gate logits `[T, N]` into expert ids `[T, K]` and weights `[T, K]`.
The family's router flavour (`RouterSpec`) says how logits become probabilities and how a chosen
set of experts is weighted; a policy only chooses the set. So every policy applies the family's
own weighting rule to its chosen experts: KA with λ=0 and K=N-1 is exactly the family's own
top-(N-1) forward, and all-expert routing uses the original router weights (DESIGN §1).

Policies see a `RoutingContext` per layer call: the layer index and, per token, its global
sequence index and position. Native top-k ignores it; counter-based sampling (KA) derives each
token's random draw from it, so draws do not depend on batching, padding or EP size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class RouterSpec:
    """A family's router flavour (softmax scoring; sigmoid/grouped flavours add fields later)."""

    num_experts: int
    top_k: int
    # Weights of the chosen experts are renormalised to sum to 1 (Mixtral; Qwen/OLMoE only
    # with norm_topk_prob). Without it they are the plain softmax probabilities.
    renormalize: bool

    def probabilities(self, logits_TN: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the model dtype, as transformers' routers do.
        return torch.softmax(logits_TN.float(), dim=-1)

    def weights(self, probs_TN: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        """The family's weighting rule applied to a chosen expert set (fp32 `[T, K]`)."""
        weights_TK = probs_TN.gather(-1, expert_ids_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK


@dataclass(frozen=True)
class RoutingContext:
    """Where a routing decision happens: keys for counter-based randomness, one entry per token."""

    layer_index: int
    sequence_T: torch.Tensor  # global sequence index of each token (int64)
    position_T: torch.Tensor  # position of each token in its sequence (int64)


class RoutingPolicy(Protocol):
    def route(
        self, logits_TN: torch.Tensor, router: RouterSpec, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (expert ids `[T, K]` int64, weights `[T, K]` fp32)."""
        ...


@dataclass(frozen=True)
class NativeTopK:
    """The family's own routing: top-k experts by router probability, family weighting."""

    def route(
        self, logits_TN: torch.Tensor, router: RouterSpec, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TN = router.probabilities(logits_TN)
        expert_ids_TK = torch.topk(probs_TN, router.top_k, dim=-1).indices
        return expert_ids_TK, router.weights(probs_TN, expert_ids_TK)
