"""Teacher families: how to read a family's config and checkpoint, and its router flavour.

A family is data: the transformers model class whose MoE blocks are replaced, the names its MoE
blocks, routers, shared experts and experts have in checkpoints, and functions giving the expert
shapes and the `RouterSpec` from the config. Which layers are MoE layers is transformers' own
decision (`decoder_sparse_step`, `mlp_only_layers`, `first_k_dense_replace`): every instance of
`sparse_block_class` in the skeleton is replaced.

LLaMA-MoE has no transformers class (remote code upstream): its config is turned into a
`LlamaConfig` and every `LlamaMLP` of a `LlamaForCausalLM` skeleton becomes an MoE block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import LlamaConfig, PretrainedConfig

from ds_moekd.teacher.routing import RouterSpec


@dataclass(frozen=True)
class ExpertShape:
    num_experts: int
    hidden_size: int
    intermediate_size: int
    # Per-expert widths when the experts of a layer differ (LLaMA-MoE); None: all intermediate_size.
    widths: tuple[int, ...] | None = None

    @property
    def expert_widths(self) -> tuple[int, ...]:
        return self.widths if self.widths is not None else (self.intermediate_size,) * self.num_experts


@dataclass(frozen=True)
class Family:
    model_type: str
    # transformers' sparse MoE block class (by name); every instance in the skeleton is replaced.
    sparse_block_class: str
    # Last name component of an MoE block in checkpoints, tried in order: original releases and
    # transformers' save_pretrained write e.g. `block_sparse_moe`, transformers' in-memory module is `mlp`.
    checkpoint_block_names: tuple[str, ...]
    # Per-expert weight names (gate, up, down; `[I, H]`, `[I, H]`, `[H, I]`) under the block, `{e}` = expert.
    expert_keys: tuple[str, str, str]
    router_kind: str  # "linear" | "linear_fp32_biased" (DeepSeek-V3) | "linear_fp32" | "mlp_gate" (LLaMA-MoE)
    expert_shape: Callable[[PretrainedConfig, int], ExpertShape]  # (config, layer index)
    router_spec: Callable[[PretrainedConfig], RouterSpec]
    # Always-on shared expert(s) kept from transformers' block, and Qwen2-MoE's sigmoid gate for it.
    shared_expert_attr: str | None = None
    shared_expert_gate_attr: str | None = None
    # Families transformers does not know: turn config.json into the config of `model_class`.
    make_config: Callable[[dict], PretrainedConfig] | None = None

    @property
    def router_weight_name(self) -> str:
        """A router tensor every MoE block has (finds the block's checkpoint prefix)."""
        return "gate.gate_network.0.weight" if self.router_kind == "mlp_gate" else "gate.weight"


_PER_EXPERT_PROJ = (
    "experts.{e}.gate_proj.weight",
    "experts.{e}.up_proj.weight",
    "experts.{e}.down_proj.weight",
)


def _uniform(num_experts_field: str, width_field: str):
    def shape(config: PretrainedConfig, layer_index: int) -> ExpertShape:
        return ExpertShape(
            getattr(config, num_experts_field), config.hidden_size, getattr(config, width_field)
        )

    return shape


def _softmax_router(num_experts_field: str, always_renormalize: bool = False):
    def spec(config: PretrainedConfig) -> RouterSpec:
        renormalize = always_renormalize or bool(getattr(config, "norm_topk_prob", False))
        return RouterSpec(
            getattr(config, num_experts_field), config.num_experts_per_tok, renormalize=renormalize
        )

    return spec


def _deepseek_v3_router(config: PretrainedConfig) -> RouterSpec:
    return RouterSpec(
        config.n_routed_experts,
        config.num_experts_per_tok,
        renormalize=bool(config.norm_topk_prob),
        scoring="sigmoid",
        scaling_factor=float(config.routed_scaling_factor),
        num_groups=config.n_group,
        topk_groups=config.topk_group,
        group_score="top2_sum",
    )


GROUP_LIMITED_TOPK = {"group_limited_greedy"}  # DeepSeek-V2's `topk_method` values that limit groups


def _deepseek_v2_router(config: PretrainedConfig) -> RouterSpec:
    # As transformers' DeepseekV2TopkRouter: softmax scores, never renormalised, times the factor;
    # "group_limited_greedy" keeps the topk_group groups with the best single expert.
    grouped = config.topk_method in GROUP_LIMITED_TOPK
    return RouterSpec(
        config.n_routed_experts,
        config.num_experts_per_tok,
        renormalize=False,
        scaling_factor=float(config.routed_scaling_factor),
        num_groups=config.n_group if grouped else 1,
        topk_groups=config.topk_group if grouped else 1,
        group_score="max",
    )


# LLaMA-MoE config.json fields (github.com/pjlab-sys4nlp/llama-moe, LlamaMoEConfig) beyond LLaMA's.
_LLAMA_MOE_ONLY = ("model_type", "architectures", "auto_map")


def _llama_moe_config(raw: dict) -> PretrainedConfig:
    if not raw.get("gate_use_softmax", True):
        raise ValueError(
            "llama_moe config.json: gate_use_softmax=false (raw top-k logits as weights) is not supported; "
            "the teacher implements the softmax gate of the released LLaMA-MoE checkpoints"
        )
    if (
        raw.get("gate_type", "TopKBalancedNoisyGate") != "TopKBalancedNoisyGate"
        or raw.get("calculator_type", "UniversalCalculator") != "UniversalCalculator"
    ):
        raise ValueError(
            f"llama_moe config.json: gate_type={raw.get('gate_type')!r}, calculator_type={raw.get('calculator_type')!r}; "
            "supported: TopKBalancedNoisyGate with UniversalCalculator (the released LLaMA-MoE models)"
        )
    if raw.get("gate_network", "mlp") != "mlp":
        raise ValueError(f"llama_moe config.json: gate_network={raw['gate_network']!r}; supported: 'mlp'")
    # Features of LLaMA-MoE's code that the teacher does not implement: refused rather than loaded
    # with silently different logits (docs/reliability.md).
    unsupported = [
        ("score_scale_factor", isinstance(raw.get("score_scale_factor"), list), "a per-layer list"),
        ("multiply_gate_scores", raw.get("multiply_gate_scores", True) is False,
         "false (expert outputs not weighted by their gate scores)"),
        ("add_weight_norm", bool(raw.get("add_weight_norm", False)), "true (a weight norm on the gate outputs)"),
    ]
    for key, present, what in unsupported:
        if present:
            raise ValueError(f"llama_moe config.json: {key}={raw[key]!r} ({what}) is not supported by the MoE "
                             "teacher; supported: one number, multiply_gate_scores=true, add_weight_norm=false")
    return LlamaConfig(**{k: v for k, v in raw.items() if k not in _LLAMA_MOE_ONLY})


def _llama_moe_shape(config: PretrainedConfig, layer_index: int) -> ExpertShape:
    sizes = getattr(config, "size_experts", None)
    widths = (
        tuple(sizes[layer_index])
        if sizes is not None
        else (config.intermediate_size // config.num_experts,) * config.num_experts
    )
    return ExpertShape(config.num_experts, config.hidden_size, max(widths), widths=widths)


def _llama_moe_router(config: PretrainedConfig) -> RouterSpec:
    # Softmax over the chosen logits (= renormalised softmax probabilities), times score_scale_factor.
    return RouterSpec(
        config.num_experts,
        config.num_selects,
        renormalize=True,
        scaling_factor=float(getattr(config, "score_scale_factor", 1.0)),
    )


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        model_type="mixtral",
        sparse_block_class="MixtralSparseMoeBlock",
        checkpoint_block_names=("block_sparse_moe", "mlp"),
        expert_keys=("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
        router_kind="linear",
        expert_shape=_uniform("num_local_experts", "intermediate_size"),
        router_spec=_softmax_router("num_local_experts", always_renormalize=True),
    ),
    "qwen2_moe": Family(
        model_type="qwen2_moe",
        sparse_block_class="Qwen2MoeSparseMoeBlock",
        checkpoint_block_names=("mlp",),
        expert_keys=_PER_EXPERT_PROJ,
        router_kind="linear",
        expert_shape=_uniform("num_experts", "moe_intermediate_size"),
        router_spec=_softmax_router("num_experts"),
        shared_expert_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
    ),
    "qwen3_moe": Family(
        model_type="qwen3_moe",
        sparse_block_class="Qwen3MoeSparseMoeBlock",
        checkpoint_block_names=("mlp",),
        expert_keys=_PER_EXPERT_PROJ,
        router_kind="linear",
        expert_shape=_uniform("num_experts", "moe_intermediate_size"),
        router_spec=_softmax_router("num_experts"),
    ),
    "olmoe": Family(
        model_type="olmoe",
        sparse_block_class="OlmoeSparseMoeBlock",
        checkpoint_block_names=("mlp",),
        expert_keys=_PER_EXPERT_PROJ,
        router_kind="linear",
        expert_shape=_uniform("num_experts", "intermediate_size"),
        router_spec=_softmax_router("num_experts"),
    ),
    "deepseek_v3": Family(
        model_type="deepseek_v3",
        sparse_block_class="DeepseekV3MoE",
        checkpoint_block_names=("mlp",),
        expert_keys=_PER_EXPERT_PROJ,
        router_kind="linear_fp32_biased",
        expert_shape=_uniform("n_routed_experts", "moe_intermediate_size"),
        router_spec=_deepseek_v3_router,
        shared_expert_attr="shared_experts",
    ),
    "deepseek_v2": Family(
        model_type="deepseek_v2",
        sparse_block_class="DeepseekV2Moe",
        checkpoint_block_names=("mlp",),
        expert_keys=_PER_EXPERT_PROJ,
        router_kind="linear_fp32",
        expert_shape=_uniform("n_routed_experts", "moe_intermediate_size"),
        router_spec=_deepseek_v2_router,
        shared_expert_attr="shared_experts",
    ),
    "llama_moe": Family(
        model_type="llama_moe",
        sparse_block_class="LlamaMLP",
        checkpoint_block_names=("mlp",),
        expert_keys=(
            "calculator.experts.weight_gate.{e}",
            "calculator.experts.weight_up.{e}",
            "calculator.experts.weight_down.{e}",
        ),
        router_kind="mlp_gate",
        expert_shape=_llama_moe_shape,
        router_spec=_llama_moe_router,
        make_config=_llama_moe_config,
    ),
}


def get_family(config_or_model_type: PretrainedConfig | str | None, source: str) -> Family:
    """The family of a config (or of a model_type); `source` (the checkpoint path) is named in errors."""
    model_type = (
        config_or_model_type
        if config_or_model_type is None or isinstance(config_or_model_type, str)
        else getattr(config_or_model_type, "model_type", None)
    )
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"{source}/config.json: model_type {model_type!r} is not a supported teacher family; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return family


def check_activation(config: PretrainedConfig, source: str) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"{source}/config.json: hidden_act={config.hidden_act!r}; the expert kernels implement SwiGLU "
            "experts (hidden_act='silu') only"
        )
