"""MoE layer sizes of the benchmark presets (SwiGLU experts)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEPreset:
    hidden: int
    inter: int
    num_experts: int
    top_k: int


PRESETS = {
    # the demo teacher's H, E and k (docs/demo.md); its experts are 128 wide, these 256
    "tiny": MoEPreset(hidden=128, inter=256, num_experts=8, top_k=2),
    "llama-moe-3.5b-4of16": MoEPreset(hidden=4096, inter=688, num_experts=16, top_k=4),
    "llama-moe-3.5b-2of8": MoEPreset(hidden=4096, inter=1376, num_experts=8, top_k=2),
    "mixtral-8x7b": MoEPreset(hidden=4096, inter=14336, num_experts=8, top_k=2),
    "qwen3-30b-a3b": MoEPreset(hidden=2048, inter=768, num_experts=128, top_k=8),
}


def experts_per_token(preset: MoEPreset, routing: str) -> int:
    """native: the family's top-k; all: every expert; ka: N-1 (KA's default num_selected)."""
    return {"native": preset.top_k, "all": preset.num_experts, "ka": preset.num_experts - 1}[routing]
