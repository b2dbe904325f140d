"""Tiny random MoE checkpoints for teacher tests, written with transformers' save_pretrained.

`starved_expert` engineers every layer's router so that expert never enters the top-2: rows 0/1
of the gate are v/-v and rows 2/3 are u/-u, so for any input one of experts 0,1 and one of
experts 2,3 has a logit >= 0, while the starved expert's logit is exactly 0.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

VOCAB = 96
NUM_EXPERTS = 8
STARVED_EXPERT = 7


def save_mixtral(path: str, *, starved_expert: int | None = STARVED_EXPERT) -> str:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        initializer_range=0.1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config)
    if starved_expert is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                _starve(layer.mlp.gate.weight, starved_expert)
    model.save_pretrained(path)
    return path


def save_qwen3_moe(path: str) -> str:
    """Qwen3-MoE with a dense MLP layer between MoE layers, un-renormalised top-k weights, tied embeddings."""
    torch.manual_seed(1)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        initializer_range=0.1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


def _starve(gate_weight_NH: torch.Tensor, expert: int) -> None:
    v_H, u_H = gate_weight_NH[0].clone(), gate_weight_NH[2].clone()
    gate_weight_NH[1] = -v_H
    gate_weight_NH[3] = -u_H
    gate_weight_NH[expert] = 0.0


def save_fused_sharded(source: str, path: str) -> str:
    """Rewrite a per-expert Mixtral checkpoint as fused experts under `mlp.` names, in two shards."""
    tensors = load_file(os.path.join(source, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})
    for name, tensor in tensors.items():
        if ".block_sparse_moe." not in name:
            out[name] = tensor
    for i in layers:
        old = f"model.layers.{i}.block_sparse_moe"
        new = f"model.layers.{i}.mlp"
        out[f"{new}.gate.weight"] = tensors[f"{old}.gate.weight"]
        out[f"{new}.experts.gate_up_proj"] = torch.stack(  # [E, 2I, H]: gate rows, then up rows
            [
                torch.cat([tensors[f"{old}.experts.{e}.w1.weight"], tensors[f"{old}.experts.{e}.w3.weight"]])
                for e in range(NUM_EXPERTS)
            ]
        )
        out[f"{new}.experts.down_proj"] = torch.stack(  # [E, H, I]
            [tensors[f"{old}.experts.{e}.w2.weight"] for e in range(NUM_EXPERTS)]
        )
    os.makedirs(path, exist_ok=True)
    names = sorted(out)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, shard_names in shards.items():
        save_file(
            {n: out[n].contiguous() for n in shard_names}, os.path.join(path, file), metadata={"format": "pt"}
        )
        weight_map.update({n: file for n in shard_names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path
