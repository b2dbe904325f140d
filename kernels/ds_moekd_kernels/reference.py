"""Plain torch reference of the grouped SwiGLU expert FFN: one loop over experts, runs anywhere.

Every faster backend is tested against this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu_reference(
    x_TH: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    w_gate_up_EHJ: torch.Tensor,
    w_down_EIH: torch.Tensor,
) -> torch.Tensor:
    """Apply expert e to its contiguous group of rows of `x_TH`; returns `[T, H]` in x's dtype."""
    num_experts, hidden, _ = w_gate_up_EHJ.shape
    if tokens_per_expert_E.numel() != num_experts or x_TH.shape[-1] != hidden:
        raise ValueError(
            f"grouped_swiglu_reference: x {tuple(x_TH.shape)}, {tokens_per_expert_E.numel()} group sizes "
            f"and weights {tuple(w_gate_up_EHJ.shape)} disagree (need [T, H], E sizes, [E, H, 2I])"
        )
    sizes = tokens_per_expert_E.tolist()
    if sum(sizes) != x_TH.shape[0]:
        raise ValueError(
            f"grouped_swiglu_reference: group sizes sum to {sum(sizes)}, x has {x_TH.shape[0]} rows"
        )
    y_TH = torch.empty_like(x_TH)
    start = 0
    for e, size in enumerate(sizes):
        if size == 0:
            continue
        x_tH = x_TH[start : start + size]
        gate_tI, up_tI = (x_tH @ w_gate_up_EHJ[e]).chunk(2, dim=-1)
        y_TH[start : start + size] = (F.silu(gate_tI) * up_tI) @ w_down_EIH[e]
        start += size
    return y_TH


def dense_swiglu_reference(
    x_TH: torch.Tensor,
    gate_weights_TE: torch.Tensor,
    w_gate_up_EHJ: torch.Tensor,
    w_down_EIH: torch.Tensor,
) -> torch.Tensor:
    """Every token through every (local) expert, weighted: sum_e g[t, e] * expert_e(x[t]).

    The dense path of ALL/SAR/KA routing (docs/kernels.md, path 2): a dropped expert is a zero weight.
    Differentiable in x and in the gate weights (SAR's router gradient); returns x's dtype.
    """
    num_experts, hidden, _ = w_gate_up_EHJ.shape
    if gate_weights_TE.shape != (x_TH.shape[0], num_experts) or x_TH.shape[-1] != hidden:
        raise ValueError(
            f"dense_swiglu_reference: x {tuple(x_TH.shape)}, gate weights {tuple(gate_weights_TE.shape)} "
            f"and weights {tuple(w_gate_up_EHJ.shape)} disagree (need [T, H], [T, E], [E, H, 2I])"
        )
    y_TH = torch.zeros_like(x_TH)
    for e in range(num_experts):
        gate_tI, up_tI = (x_TH @ w_gate_up_EHJ[e]).chunk(2, dim=-1)
        y_TH = y_TH + gate_weights_TE[:, e : e + 1].to(x_TH.dtype) * ((F.silu(gate_tI) * up_tI) @ w_down_EIH[e])
    return y_TH
