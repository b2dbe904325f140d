"""The grouped SwiGLU reference against a per-expert computation with transformers' weight layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ds_moekd.kernels import grouped_swiglu_reference


def test_grouped_reference_matches_per_expert_linear_layers():
    g = torch.Generator().manual_seed(0)
    hidden, inter, sizes = 8, 6, [3, 0, 5, 1]
    # nn.Linear-style weights ([out, in]) as checkpoints store them
    gate_EIH = torch.randn(4, inter, hidden, generator=g)
    up_EIH = torch.randn(4, inter, hidden, generator=g)
    down_EHI = torch.randn(4, hidden, inter, generator=g)
    x_TH = torch.randn(sum(sizes), hidden, generator=g)
    w_gate_up_EHJ = torch.cat([gate_EIH, up_EIH], dim=1).transpose(1, 2)
    y_TH = grouped_swiglu_reference(x_TH, torch.tensor(sizes), w_gate_up_EHJ, down_EHI.transpose(1, 2))
    expected = torch.cat(
        [
            F.linear(F.silu(F.linear(x, gate_EIH[e])) * F.linear(x, up_EIH[e]), down_EHI[e])
            for e, x in enumerate(x_TH.split(sizes))
        ]
    )
    torch.testing.assert_close(y_TH, expected)


def test_group_sizes_must_cover_the_rows():
    w_gate_up_EHJ, w_down_EIH = torch.zeros(2, 4, 6), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="group sizes sum to 3, x has 4 rows"):
        grouped_swiglu_reference(torch.zeros(4, 4), torch.tensor([1, 2]), w_gate_up_EHJ, w_down_EIH)


def test_dense_reference_equals_per_token_weighted_sum_and_has_gate_gradients():
    import torch.nn.functional as F
    from ds_moekd.kernels import dense_swiglu_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g)
    w_gu, w_d = torch.randn(3, 6, 8, generator=g), torch.randn(3, 4, 6, generator=g)
    gates = torch.rand(5, 3, generator=g).requires_grad_(True)
    y = dense_swiglu_reference(x, gates, w_gu, w_d)
    for t in range(5):
        expected = sum(
            gates[t, e] * ((F.silu(x[t] @ w_gu[e][:, :4]) * (x[t] @ w_gu[e][:, 4:])) @ w_d[e]) for e in range(3)
        )
        torch.testing.assert_close(y[t], expected)
    y.sum().backward()
    assert gates.grad is not None and gates.grad.abs().min() > 0
