"""The demo's model shapes and the LLaMA-MoE-style conversion of a dense model into a Mixtral MoE.

The teacher is built in two stages (as LLaMA-MoE was): a dense Mistral model is pretrained, then
each FFN's intermediate neurons are partitioned into experts and training continues with top-k
routing. Mistral's attention, norms and rotary embeddings are exactly Mixtral's, so everything but
the FFN copies over unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)


@dataclass(frozen=True)
class TeacherShape:
    hidden: int
    layers: int
    heads: int
    num_experts: int
    expert_intermediate: int
    top_k: int


@dataclass(frozen=True)
class StudentShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


def _common(vocab_size: int, special: dict[str, int]) -> dict:
    return dict(
        vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **special,
    )


def dense_teacher(shape: TeacherShape, vocab_size: int, special: dict[str, int]) -> MistralForCausalLM:
    """The dense model the MoE is split from: its FFN is as wide as all experts together."""
    config = MistralConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, intermediate_size=shape.num_experts * shape.expert_intermediate,
        sliding_window=None, **_common(vocab_size, special),
    )
    return MistralForCausalLM(config)


def student(shape: StudentShape, vocab_size: int, special: dict[str, int]) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, intermediate_size=shape.intermediate, **_common(vocab_size, special),
    )
    return LlamaForCausalLM(config)


def _balanced_clusters(rows_IH: torch.Tensor, num_clusters: int, generator: torch.Generator,
                       iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition rows into equal-size clusters by cosine similarity (balanced spherical k-means).

    Returns (cluster of each row [I], unit centroids [N, H]). Assignment is greedy over all
    (row, cluster) pairs by similarity, each cluster capped at I/N rows.
    """
    unit_IH = torch.nn.functional.normalize(rows_IH, dim=-1)
    num_rows = unit_IH.shape[0]
    capacity = num_rows // num_clusters
    centroids_NH = unit_IH[torch.randperm(num_rows, generator=generator)[:num_clusters]]
    assignment_I = torch.empty(num_rows, dtype=torch.long)
    for _ in range(iterations):
        similarity_IN = unit_IH @ centroids_NH.T
        order = torch.argsort(similarity_IN.flatten(), descending=True, stable=True)
        assignment_I.fill_(-1)
        fill = [0] * num_clusters
        for flat in order.tolist():
            row, cluster = divmod(flat, num_clusters)
            if assignment_I[row] < 0 and fill[cluster] < capacity:
                assignment_I[row] = cluster
                fill[cluster] += 1
        centroids_NH = torch.nn.functional.normalize(
            torch.stack([unit_IH[assignment_I == c].mean(0) for c in range(num_clusters)]), dim=-1)
    return assignment_I, centroids_NH


@torch.no_grad()
def split_into_experts(dense: MistralForCausalLM, shape: TeacherShape, generator: torch.Generator,
                       router_scale: float = 1.0) -> MixtralForCausalLM:
    """LLaMA-MoE-style conversion: each expert gets a cluster of the dense FFN's neurons.

    Neurons are clustered by their gate_proj rows (neurons that fire for similar inputs share an
    expert) and each router row starts at its cluster's centroid times `router_scale`, so a token is
    first routed to the experts whose neurons it activates most; a scale below 1 starts the router
    soft, with the unselected experts still weighted. Down projections are scaled by N/k (LLaMA-MoE's
    score scale): top-k output weights sum to one, while the dense FFN summed all N slices.
    """
    dense_config = dense.config
    config = MixtralConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads, intermediate_size=shape.expert_intermediate,
        num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k, sliding_window=None,
        router_aux_loss_coef=0.01,
        **_common(dense_config.vocab_size, {k: getattr(dense_config, k) for k in
                                             ("bos_token_id", "eos_token_id", "pad_token_id")}),
    )
    moe = MixtralForCausalLM(config)
    moe_state = moe.state_dict()
    dense_state = dense.state_dict()
    for name in moe_state:
        if name in dense_state:  # embeddings, attention, norms, lm_head
            moe_state[name].copy_(dense_state[name])
    scale = shape.num_experts / shape.top_k
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        ffn = dense_layer.mlp
        gate_IH, up_IH, down_HI = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
        assignment_I, centroids_NH = _balanced_clusters(gate_IH, shape.num_experts, generator)
        moe_block = moe_layer.mlp
        for expert in range(shape.num_experts):
            neurons = (assignment_I == expert).nonzero().squeeze(-1)
            moe_block.experts.gate_up_proj[expert].copy_(torch.cat([gate_IH[neurons], up_IH[neurons]]))
            moe_block.experts.down_proj[expert].copy_(down_HI[:, neurons] * scale)
        moe_block.gate.weight.copy_(centroids_NH * router_scale)
    return moe
