"""Router modules: hidden states `[T, H]` -> gate logits `[T, N]`, with checkpoint parameter names.

Their parameter names under the MoE block equal the checkpoint's (`gate.weight`,
`gate.e_score_correction_bias`, `gate.gate_network.0.weight`, ...), so the loader fills them by
name. They are the only teacher parameters SAR trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearRouter(nn.Module):
    """`gate.weight [N, H]` (Mixtral, Qwen, OLMoE, DeepSeek); DeepSeek computes logits in fp32 and
    V3 adds `e_score_correction_bias [N]` (used by the routing policy for the choice only)."""

    def __init__(
        self, num_experts: int, hidden: int, *, fp32: bool, correction_bias: bool, dtype: torch.dtype
    ):
        super().__init__()
        weight_dtype = torch.float32 if fp32 else dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=weight_dtype), requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )
        self.fp32 = fp32

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            return F.linear(x_TH.float(), self.weight.float())
        return F.linear(x_TH, self.weight)


class MLPGate(nn.Module):
    """LLaMA-MoE's TopKBalancedNoisyGate: logits = W2 tanh(W1 x); given standard normals (the EP block
    passes them in train mode, SAR's router step) it adds normal * (softplus(W_noise x) + noise_epsilon),
    as the original gate does in training."""

    def __init__(
        self, num_experts: int, hidden: int, *, add_noise: bool, noise_epsilon: float, dtype: torch.dtype
    ):
        super().__init__()
        self.gate_network = nn.Sequential(
            nn.Linear(hidden, num_experts, bias=False, dtype=dtype),
            nn.Tanh(),
            nn.Linear(num_experts, num_experts, bias=False, dtype=dtype),
        )
        self.weight_noise = nn.Linear(hidden, num_experts, bias=False, dtype=dtype) if add_noise else None
        self.noise_epsilon = noise_epsilon
        self.requires_grad_(False)

    def forward(self, x_TH: torch.Tensor, standard_normal_TN: torch.Tensor | None = None) -> torch.Tensor:
        logits_TN = self.gate_network(x_TH)
        if standard_normal_TN is not None and self.weight_noise is not None:
            noise_std_TN = F.softplus(self.weight_noise(x_TH)) + self.noise_epsilon
            logits_TN = logits_TN + standard_normal_TN * noise_std_TN
        return logits_TN


def make_router(kind: str, config, num_experts: int, dtype: torch.dtype) -> nn.Module:
    hidden = config.hidden_size
    if kind == "mlp_gate":
        return MLPGate(
            num_experts,
            hidden,
            add_noise=bool(getattr(config, "gate_add_noise", True)),
            noise_epsilon=float(getattr(config, "gate_noise_epsilon", 1e-2)),
            dtype=dtype,
        )
    if kind not in ("linear", "linear_fp32", "linear_fp32_biased"):
        raise ValueError(f"unknown router kind {kind!r}")
    return LinearRouter(
        num_experts, hidden, fp32=kind != "linear", correction_bias=kind == "linear_fp32_biased", dtype=dtype
    )
