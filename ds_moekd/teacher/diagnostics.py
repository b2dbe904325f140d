"""Gate diagnostics of one MoE layer forward, for reports (the paper's motivation, docs/teacher.md).

Native top-k uses the k best experts; the router probability left on the others
(`1 - sum of the native top-k probabilities`) is what ALL/KA/SAR reach. Recorded per layer for
this rank's real (non-padding) tokens as sums and counts, so ranks and batches add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_moekd.teacher.routing import RouterSpec


@dataclass(frozen=True)
class GateDiagnostics:
    layer_index: int
    tokens: int  # real tokens of this rank in this forward
    unrouted_mass_sum: float  # sum over those tokens of the probability native top-k leaves unused
    load_N: torch.Tensor  # assignments per expert under the routing policy that ran (int64)
    probabilities_TN: torch.Tensor  # the router's distribution over all N experts per real token (CPU)

    @property
    def unrouted_mass_mean(self) -> float:
        return self.unrouted_mass_sum / max(1, self.tokens)


def gate_diagnostics(
    layer_index: int,
    logits_TN: torch.Tensor,
    router: RouterSpec,
    expert_ids_TK: torch.Tensor,
) -> GateDiagnostics:
    """Diagnostics of one layer's routing of T real tokens (the MoE block routes no padding)."""
    with torch.no_grad():
        probs_TN = router.probabilities(logits_TN)
        native_TK = router.select_top(router.scores(logits_TN), router.top_k, group_limited=True)
        unrouted_T = 1.0 - probs_TN.gather(-1, native_TK).sum(dim=-1)
        load_N = torch.bincount(expert_ids_TK.reshape(-1), minlength=router.num_experts)
        return GateDiagnostics(
            layer_index=layer_index,
            tokens=expert_ids_TK.shape[0],
            unrouted_mass_sum=float(unrouted_T.double().sum()),
            load_N=load_N.cpu(),
            probabilities_TN=probs_TN.float().cpu(),
        )
