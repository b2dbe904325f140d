"""Tiny random MoE checkpoints for teacher tests, written with transformers' save_pretrained
(LLaMA-MoE, which transformers lacks, is written by hand in its public layout).

`starved_expert` engineers every layer's router so that expert never enters the top-2: rows 0/1
of the gate are v/-v and rows 2/3 are u/-u, so for any input one of experts 0,1 and one of
experts 2,3 has a logit >= 0, while the starved expert's logit is exactly 0.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

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


_SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}


def _save_with_random_routers(config, path: str, seed: int) -> str:
    """transformers initialises some routers (and DeepSeek's correction bias) to zero: randomise them
    so routing depends on the input and the bias matters."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                tensor.normal_(0.0, 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.3, 0.3)
    model.save_pretrained(path)
    return path


def save_qwen2_moe(path: str) -> str:
    """Shared expert with a sigmoid gate; layer 1 dense (mlp_only_layers), layer 2 dense (decoder_sparse_step=2 skips odd layers)."""
    config = Qwen2MoeConfig(
        **_SMALL,
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=36,
        num_hidden_layers=4,
        num_key_value_heads=2,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        tie_word_embeddings=False,
    )
    return _save_with_random_routers(config, path, seed=2)


def save_olmoe(path: str) -> str:
    config = OlmoeConfig(
        **_SMALL,
        intermediate_size=24,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _save_with_random_routers(config, path, seed=3)


_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}


def save_deepseek_v3(path: str) -> str:
    """Sigmoid router with correction bias, 4 groups (top-2 groups), scaling 2.5, one dense first layer."""
    config = DeepseekV3Config(
        **_SMALL,
        **_MLA,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_key_value_heads=4,
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        first_k_dense_replace=1,
        tie_word_embeddings=False,
    )
    return _save_with_random_routers(config, path, seed=4)


def save_deepseek_v2(path: str) -> str:
    """Softmax router, group_limited_greedy (4 groups, best 2), scaling 1.5, shared expert."""
    config = DeepseekV2Config(
        **_SMALL,
        **_MLA,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_key_value_heads=4,
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        n_shared_experts=1,
        first_k_dense_replace=0,
        tie_word_embeddings=False,
    )
    return _save_with_random_routers(config, path, seed=5)


# LLaMA-MoE (github.com/pjlab-sys4nlp/llama-moe): LLaMA with every MLP replaced by a noisy top-k
# MLP gate and SwiGLU experts of per-layer, per-expert widths.
LLAMA_MOE_SIZES = [[8, 12, 8, 4, 12, 8, 16, 4], [6, 6, 10, 10, 6, 6, 10, 10]]
LLAMA_MOE_EXTRA = {
    "num_experts": NUM_EXPERTS,
    "num_selects": 2,
    "size_experts": LLAMA_MOE_SIZES,
    "gate_type": "TopKBalancedNoisyGate",
    "gate_network": "mlp",
    "gate_use_softmax": True,
    "gate_use_balance": True,
    "gate_balance_loss_weight": 1e-2,
    "gate_add_noise": True,
    "gate_noise_epsilon": 1e-2,
    "calculator_type": "UniversalCalculator",
    "multiply_gate": False,
    "score_scale_factor": 4.0,
}


def save_llama_moe(path: str) -> str:
    torch.manual_seed(6)
    llama = LlamaConfig(
        **_SMALL, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False
    )
    tensors = {k: v for k, v in LlamaForCausalLM(llama).state_dict().items() if ".mlp." not in k}
    hidden = llama.hidden_size
    for layer, sizes in enumerate(LLAMA_MOE_SIZES):
        block = f"model.layers.{layer}.mlp"
        tensors[f"{block}.gate.gate_network.0.weight"] = torch.randn(NUM_EXPERTS, hidden) * 0.5
        tensors[f"{block}.gate.gate_network.2.weight"] = torch.randn(NUM_EXPERTS, NUM_EXPERTS) * 0.8
        tensors[f"{block}.gate.weight_noise.weight"] = torch.randn(NUM_EXPERTS, hidden) * 0.1
        for e, width in enumerate(sizes):
            experts = f"{block}.calculator.experts"
            tensors[f"{experts}.weight_gate.{e}"] = torch.randn(width, hidden) * 0.2
            tensors[f"{experts}.weight_up.{e}"] = torch.randn(width, hidden) * 0.2
            tensors[f"{experts}.weight_down.{e}"] = torch.randn(hidden, width) * 0.2
    os.makedirs(path, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    raw = llama.to_dict()
    raw.update(LLAMA_MOE_EXTRA, model_type="llama_moe", architectures=["LlamaMoEForCausalLM"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    return path


FP8_BLOCK = [16, 16]


def save_fp8_with_mtp(source: str, path: str) -> tuple[str, str]:
    """DeepSeek-V3-style FP8 copy of `source` (block-scaled linear weights, `weight_scale_inv`) with
    one multi-token-prediction layer appended; also writes the exactly dequantised fp32 checkpoint
    (the reference). Returns (fp8 path, dequantised path)."""
    tensors = load_file(os.path.join(source, "model.safetensors"))
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        is_linear = name.endswith("proj.weight") and w.dim() == 2
        if not is_linear:
            quantized[name] = dequantized[name] = w
            continue
        q, scale = _quantize_blocks(w)
        quantized[name], quantized[name + "_scale_inv"] = q, scale
        dequantized[name] = q.float() * _expand(scale, w.shape)
    mtp = f"model.layers.{config['num_hidden_layers']}"
    last = f"model.layers.{config['num_hidden_layers'] - 1}"
    for name in [n for n in tensors if n.startswith(last + ".")]:
        quantized[mtp + name[len(last) :]] = quantized[name].clone()
    quantized[f"{mtp}.eh_proj.weight"] = torch.randn(config["hidden_size"], 2 * config["hidden_size"])
    fp8_path, ref_path = path + "_fp8", path + "_dequantized"
    for out_path, out, extra in (
        (
            fp8_path,
            quantized,
            {
                "quantization_config": {
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "activation_scheme": "dynamic",
                    "weight_block_size": FP8_BLOCK,
                },
                "num_nextn_predict_layers": 1,
            },
        ),
        (ref_path, dequantized, {}),
    ):
        os.makedirs(out_path, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in out.items()},
            os.path.join(out_path, "model.safetensors"),
            metadata={"format": "pt"},
        )
        with open(os.path.join(out_path, "config.json"), "w") as f:
            json.dump({**config, **extra}, f)
    return fp8_path, ref_path


def _expand(scale_BC: torch.Tensor, shape) -> torch.Tensor:
    rows, cols = FP8_BLOCK
    return scale_BC.repeat_interleave(rows, 0)[: shape[0]].repeat_interleave(cols, 1)[:, : shape[1]]


def _quantize_blocks(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = FP8_BLOCK
    blocks_r, blocks_c = -(-w_OI.shape[0] // rows), -(-w_OI.shape[1] // cols)
    scale_BC = torch.empty(blocks_r, blocks_c)
    for i in range(blocks_r):
        for j in range(blocks_c):
            block = w_OI[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]
            scale_BC[i, j] = block.abs().max().clamp(min=1e-12) / 448.0
    q = (w_OI / _expand(scale_BC, w_OI.shape)).to(torch.float8_e4m3fn)
    return q, scale_BC


@functools.lru_cache(maxsize=1)
def all_family_checkpoints() -> dict[str, str]:
    """One tiny checkpoint per family (plus layout/FP8 variants), written once per test session."""
    root = tempfile.mkdtemp(prefix="tiny_moe_")
    paths = {
        "mixtral": save_mixtral(os.path.join(root, "mixtral")),
        "qwen2_moe": save_qwen2_moe(os.path.join(root, "qwen2_moe")),
        "qwen3_moe": save_qwen3_moe(os.path.join(root, "qwen3_moe")),
        "olmoe": save_olmoe(os.path.join(root, "olmoe")),
        "deepseek_v3": save_deepseek_v3(os.path.join(root, "deepseek_v3")),
        "deepseek_v2": save_deepseek_v2(os.path.join(root, "deepseek_v2")),
        "llama_moe": save_llama_moe(os.path.join(root, "llama_moe")),
    }
    paths["mixtral_fused_sharded"] = save_fused_sharded(
        paths["mixtral"], os.path.join(root, "mixtral_fused_sharded")
    )
    paths["deepseek_v3_fp8"], paths["deepseek_v3_dequantized"] = save_fp8_with_mtp(
        paths["deepseek_v3"], os.path.join(root, "deepseek_v3")
    )
    return paths
