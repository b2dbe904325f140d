"""Teacher families: how to read a family's config and checkpoint, and its router flavour.

A family is data: the transformers class whose MoE blocks are replaced, the names its MoE blocks
and experts have in checkpoints, and a function giving the expert shape and `RouterSpec` from the
config. Adding qwen2_moe (shared expert), olmoe, deepseek_v3 (sigmoid router, dense first layers)
or llama_moe means adding an entry here (plus any new router flavour in routing.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from ds_moekd.routing import RouterSpec


@dataclass(frozen=True)
class ExpertShape:
    num_experts: int
    hidden_size: int
    intermediate_size: int


@dataclass(frozen=True)
class Family:
    model_type: str
    # transformers' sparse MoE block class (by name); every instance in the skeleton is replaced,
    # so transformers' own rules decide which layers are MoE layers (decoder_sparse_step, ...).
    sparse_block_class: str
    # Last name component of an MoE block in checkpoints, tried in order: original releases and
    # transformers' save_pretrained write e.g. `block_sparse_moe`, transformers' in-memory module is `mlp`.
    checkpoint_block_names: tuple[str, ...]
    # Per-expert linear names (gate, up, down) in `...experts.{e}.{name}.weight` keys.
    expert_linear_names: tuple[str, str, str]
    router_weight_name: str
    expert_shape: Callable[[PretrainedConfig], ExpertShape]
    router_spec: Callable[[PretrainedConfig], RouterSpec]


def _mixtral_shape(config: PretrainedConfig) -> ExpertShape:
    return ExpertShape(config.num_local_experts, config.hidden_size, config.intermediate_size)


def _mixtral_router(config: PretrainedConfig) -> RouterSpec:
    return RouterSpec(config.num_local_experts, config.num_experts_per_tok, renormalize=True)


def _qwen3_moe_shape(config: PretrainedConfig) -> ExpertShape:
    return ExpertShape(config.num_experts, config.hidden_size, config.moe_intermediate_size)


def _qwen3_moe_router(config: PretrainedConfig) -> RouterSpec:
    return RouterSpec(config.num_experts, config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        model_type="mixtral",
        sparse_block_class="MixtralSparseMoeBlock",
        checkpoint_block_names=("block_sparse_moe", "mlp"),
        expert_linear_names=("w1", "w3", "w2"),
        router_weight_name="gate.weight",
        expert_shape=_mixtral_shape,
        router_spec=_mixtral_router,
    ),
    "qwen3_moe": Family(
        model_type="qwen3_moe",
        sparse_block_class="Qwen3MoeSparseMoeBlock",
        checkpoint_block_names=("mlp",),
        expert_linear_names=("gate_proj", "up_proj", "down_proj"),
        router_weight_name="gate.weight",
        expert_shape=_qwen3_moe_shape,
        router_spec=_qwen3_moe_router,
    ),
}


def get_family(config: PretrainedConfig, source: str) -> Family:
    """The family of a loaded config; `source` (the checkpoint path) is named in errors."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"{source}/config.json: model_type {model_type!r} is not a supported teacher family; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"{source}/config.json: hidden_act={config.hidden_act!r}; the expert kernels implement SwiGLU "
            "experts (hidden_act='silu') only"
        )
    return family
