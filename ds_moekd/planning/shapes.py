"""Model sizes for `ds-moekd plan`, read from config.json files only (docs/plan.md).

The teacher's skeleton is built on the meta device, as the loader does (no weights are read), and
its parameters are split into expert weights (sharded over the EP group) and everything else
(replicated). The student's skeleton gives its parameter count and its largest layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TeacherShape:
    family: str
    layers: int
    moe_layers: int
    hidden: int
    vocab: int
    num_experts: int
    top_k: int
    expert_params: int  # all routed experts of all MoE layers
    replicated_params: int  # embeddings, attention, norms, routers, shared/dense MLPs, lm_head
    active_nonexpert_matmul_params: int  # per token: attention, shared/dense MLPs, lm_head
    params_per_expert: int  # one routed expert of one MoE layer (3·H·I)
    kv_width: int  # K + V values per token per layer (attention cache)
    fp8_checkpoint: bool


@dataclass(frozen=True)
class StudentShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    embedding_params: int
    largest_layer_params: int
    param_numels: tuple[int, ...]  # every parameter tensor's size, in module order (ZeRO-3 persistence)


def _read_json(path: Path) -> dict:
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise FileNotFoundError(f"plan: {config} does not exist (give a checkpoint folder or its config.json)")
    return json.loads(config.read_text())


def _kv_width(config) -> int:
    """K + V values per token per layer: MLA (DeepSeek) caches its compressed latent and rope key."""
    if getattr(config, "kv_lora_rank", None):
        return config.kv_lora_rank + config.qk_rope_head_dim
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def teacher_shape(path: str | Path) -> TeacherShape:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from ds_moekd.teacher.model import _read_config

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    raw = _read_json(folder)
    family, config, _ = _read_config(str(folder))
    with torch.device("meta"):
        model = LlamaForCausalLM(config) if family.make_config is not None else AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    expert_params = replaced = moe_layers = 0
    shape = family.expert_shape(config, 0)
    for name, module in model.named_modules():
        if type(module).__name__ != family.sparse_block_class:
            continue
        layer = int(name.rsplit(".", 2)[-2])
        shape = family.expert_shape(config, layer)
        moe_layers += 1
        expert_params += 3 * shape.hidden_size * sum(shape.expert_widths)
        if family.make_config is not None:  # LLaMA-MoE: the dense LlamaMLP is what the experts replace
            replaced += sum(p.numel() for p in module.parameters())
        else:
            replaced += sum(p.numel() for n, p in module.named_parameters() if n.split(".")[0] == "experts")
    replicated = total - replaced
    embed = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight
    tied = lm_head is model.get_input_embeddings().weight
    return TeacherShape(
        family=family.model_type,
        layers=config.num_hidden_layers,
        moe_layers=moe_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        num_experts=shape.num_experts,
        top_k=family.router_spec(config).top_k,
        expert_params=expert_params,
        replicated_params=replicated,
        active_nonexpert_matmul_params=replicated - embed + (embed if tied else 0),
        params_per_expert=expert_params // max(1, moe_layers * shape.num_experts),
        kv_width=_kv_width(config),
        fp8_checkpoint=(raw.get("quantization_config") or {}).get("quant_method") == "fp8",
    )


def student_shape(path: str | Path) -> StudentShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    _read_json(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else []
    embed = model.get_input_embeddings().weight.numel()
    return StudentShape(
        params=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        kv_width=_kv_width(config),
        vocab=config.vocab_size,
        embedding_params=embed,
        largest_layer_params=max([sum(p.numel() for p in layer.parameters()) for layer in layers] + [embed]),
        param_numels=tuple(p.numel() for p in model.parameters()),
    )
