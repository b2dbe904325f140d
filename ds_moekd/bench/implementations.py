"""The expert-FFN implementations a benchmark compares, all as `fn(x_TH, ids_TK, weights_TK) -> y_TH`
on the same weights (`w_gate_up [E, H, 2I]`, `w_down [E, I, H]`). A builder raises NotMeasured with
the reason when an implementation cannot run here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_moekd.kernels import moe_experts, unavailable_reason


class NotMeasured(Exception):
    pass


def python_loop(w_gate_up, w_down):
    """Per-expert Python loop, as transformers' eager experts and DeepSpeed's expert modules run."""

    def run(x, ids, weights):
        out = torch.zeros_like(x)
        for e in range(w_gate_up.shape[0]):
            token_idx, slot = torch.where(ids == e)
            if token_idx.numel():
                gate, up = (x[token_idx] @ w_gate_up[e]).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ w_down[e]
                out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        return out

    return run


def transformers_experts(w_gate_up, w_down, implementation: str):
    """transformers' MixtralExperts (checkpoint layout) run with one of its `experts_implementation`s."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError as err:
        raise NotMeasured(f"transformers has no MixtralExperts: {err}") from None
    if implementation == "batched_mm" and w_gate_up.device.type == "cpu":
        raise NotMeasured("batched_mm is not run on CPU (unusably slow there, docs/kernels.md)")
    num_experts, hidden, two_inter = w_gate_up.shape
    config = MixtralConfig(
        hidden_size=hidden, intermediate_size=two_inter // 2, num_local_experts=num_experts
    )
    config._experts_implementation = implementation
    with torch.device("meta"):
        experts = MixtralExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w_gate_up.transpose(1, 2).contiguous(), requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w_down.transpose(1, 2).contiguous(), requires_grad=False)
    return lambda x, ids, weights: experts(x, ids, weights.to(x.dtype))


def ours_with_backend(w_gate_up, w_down, backend: str, path: str = "auto"):
    reason = backend != "auto" and unavailable_reason(backend, w_gate_up.device, w_gate_up.dtype)
    if reason:
        raise NotMeasured(reason)
    return lambda x, ids, weights: moe_experts(x, ids, weights, w_gate_up, w_down, backend=backend, path=path)


def implementations(w_gate_up, w_down) -> dict:
    """name -> zero-argument builder; each builder returns the callable or raises NotMeasured."""
    return {
        "python_loop": lambda: python_loop(w_gate_up, w_down),
        "transformers_eager": lambda: transformers_experts(w_gate_up, w_down, "eager"),
        "transformers_grouped_mm": lambda: transformers_experts(w_gate_up, w_down, "grouped_mm"),
        "transformers_batched_mm": lambda: transformers_experts(w_gate_up, w_down, "batched_mm"),
        "torch_grouped_mm": lambda: ours_with_backend(w_gate_up, w_down, "torch_grouped_mm", "sparse"),
        "megablocks": lambda: ours_with_backend(w_gate_up, w_down, "megablocks", "sparse"),
        "ours": lambda: ours_with_backend(w_gate_up, w_down, "auto"),
    }
