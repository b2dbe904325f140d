"""Every teacher family under every routing policy against an independent forward of the same checkpoint.

transformers' own model is the reference for the families it has: NativeTopK = its forward,
AllExperts = its forward with num_experts_per_tok = N, KASample(λ=0) = with N-1 (topk_group =
n_group for DeepSeek, whose KA ignores group limits). LLaMA-MoE (no transformers class) is
checked against a plain-torch transcription of its published forward (gate + UniversalCalculator).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.teacher_decoding import teacher_generate
from helpers.tiny_moe_checkpoints import NUM_EXPERTS, VOCAB, all_family_checkpoints
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK

TOLERANCE = 1e-4  # fp32 logits
HF_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2"]
POLICIES = {"native": NativeTopK(), "all": AllExperts(), "ka0": KASample(resample_prob=0.0)}


def padded_batch():
    """Right and left padding, and one unpadded row."""
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    attention_mask[2, :3] = 0
    return input_ids, attention_mask


def max_diff_on_tokens(a_BSV, b_BSV, attention_mask) -> float:
    real = attention_mask.bool()
    return (a_BSV[real] - b_BSV[real]).abs().max().item()


def experts_per_token(policy: str, num_experts: int) -> int | None:
    return {"native": None, "all": num_experts, "ka0": num_experts - 1}[policy]


def hf_reference(path: str, k: int | None):
    """transformers' model of `path`, with num_experts_per_tok = k (and no group limit) when given."""
    overrides = {}
    if k is not None:
        overrides["num_experts_per_tok"] = k
        with open(os.path.join(path, "config.json")) as f:
            n_group = json.load(f).get("n_group")
        if n_group:
            overrides["topk_group"] = n_group
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides).eval()


@pytest.fixture(scope="module")
def teachers():
    paths = all_family_checkpoints()
    return {
        name: MoETeacher.from_pretrained(paths[name])
        for name in [*HF_FAMILIES, "llama_moe", "deepseek_v3_fp8"]
    }


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_policy_matches_transformers(teachers, family, policy):
    input_ids, attention_mask = padded_batch()
    teacher = teachers[family]
    reference = hf_reference(all_family_checkpoints()[family], experts_per_token(policy, teacher.num_experts))
    with torch.no_grad():
        ours = teacher(input_ids, attention_mask=attention_mask, routing=POLICIES[policy]).logits
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert max_diff_on_tokens(ours, theirs, attention_mask) <= TOLERANCE


def test_fp8_checkpoint_is_dequantised_per_tensor_and_mtp_layer_skipped(teachers):
    paths = all_family_checkpoints()
    input_ids, attention_mask = padded_batch()
    reference = hf_reference(paths["deepseek_v3_dequantized"], None)
    teacher = teachers["deepseek_v3_fp8"]
    with torch.no_grad():
        ours = teacher(input_ids, attention_mask=attention_mask).logits
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert max_diff_on_tokens(ours, theirs, attention_mask) <= TOLERANCE
    # Everything but the multi-token-prediction layer was read, once, in its stored (FP8) size.
    tensors = load_file(os.path.join(paths["deepseek_v3_fp8"], "model.safetensors"))
    mtp = f"model.layers.{teacher.config.num_hidden_layers}."
    expected = sum(t.numel() * t.element_size() for n, t in tensors.items() if not n.startswith(mtp))
    assert teacher.bytes_read == expected
    assert teacher.bytes_read < teachers["deepseek_v3"].bytes_read


# --- LLaMA-MoE: independent plain-torch reference of its published forward ---------------------


class LlamaMoeReferenceMLP(nn.Module):
    """TopKBalancedNoisyGate (eval: no noise) + UniversalCalculator, token by token:
    logits = W2 tanh(W1 x); top-k logits; softmax over them; y = sum_j score_j * scale * expert_j(x)."""

    def __init__(self, tensors: dict, block: str, num_selects: int, scale: float):
        super().__init__()
        self.w1, self.w2 = (
            tensors[f"{block}.gate.gate_network.0.weight"],
            tensors[f"{block}.gate.gate_network.2.weight"],
        )
        experts = f"{block}.calculator.experts"
        self.experts = [
            (
                tensors[f"{experts}.weight_gate.{e}"],
                tensors[f"{experts}.weight_up.{e}"],
                tensors[f"{experts}.weight_down.{e}"],
            )
            for e in range(NUM_EXPERTS)
        ]
        self.num_selects, self.scale = num_selects, scale

    def forward(self, hidden_BSH):
        x_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        logits_TN = torch.tanh(x_TH @ self.w1.T) @ self.w2.T
        top_logits_TK, top_ids_TK = logits_TN.topk(self.num_selects, dim=1)
        scores_TK = torch.softmax(top_logits_TK, dim=1)
        y_TH = torch.zeros_like(x_TH)
        for t in range(x_TH.shape[0]):
            for j in range(self.num_selects):
                gate, up, down = self.experts[int(top_ids_TK[t, j])]
                y_TH[t] += scores_TK[t, j] * self.scale * ((F.silu(gate @ x_TH[t]) * (up @ x_TH[t])) @ down.T)
        return y_TH.view_as(hidden_BSH)


def llama_moe_reference(path: str, num_selects: int | None):
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict({k: v for k, v in tensors.items() if ".mlp." not in k}, strict=False)
    for i, layer in enumerate(model.model.layers):
        layer.mlp = LlamaMoeReferenceMLP(
            tensors, f"model.layers.{i}.mlp", num_selects or raw["num_selects"], raw["score_scale_factor"]
        )
    return model


@pytest.mark.parametrize("policy", list(POLICIES))
def test_llama_moe_matches_plain_torch_reference(teachers, policy):
    input_ids, attention_mask = padded_batch()
    teacher = teachers["llama_moe"]
    reference = llama_moe_reference(
        all_family_checkpoints()["llama_moe"], experts_per_token(policy, NUM_EXPERTS)
    )
    with torch.no_grad():
        ours = teacher(input_ids, attention_mask=attention_mask, routing=POLICIES[policy]).logits
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert max_diff_on_tokens(ours, theirs, attention_mask) <= TOLERANCE


def test_llama_moe_experts_of_different_widths_are_zero_padded(teachers):
    teacher = teachers["llama_moe"]
    block = teacher.moe_blocks[0]
    widths = teacher.config.size_experts[0]
    # Expert 3 (width 4) is padded to the layer's widest (16): its extra gate/up columns and down rows are 0.
    assert block.w_gate_up_EHJ.shape[-1] == 2 * max(widths)
    assert block.w_gate_up_EHJ[3, :, widths[3] : max(widths)].abs().sum() == 0
    assert block.w_down_EIH[3, widths[3] :].abs().sum() == 0
    assert teacher.expert_bytes_read == 4 * 3 * 32 * sum(sum(layer) for layer in teacher.config.size_experts)


def test_sparse_and_dense_dispatch_agree_on_the_same_routing(teachers):
    """The same expert set routed through the all-to-all path (K <= N/2) and the dense path."""
    teacher = teachers["qwen3_moe"]
    input_ids, attention_mask = padded_batch()
    half = KASample(resample_prob=0.0, num_selected=NUM_EXPERTS // 2)  # sparse path
    over_half = KASample(resample_prob=0.0, num_selected=NUM_EXPERTS // 2 + 1)  # dense path
    reference_half = hf_reference(all_family_checkpoints()["qwen3_moe"], NUM_EXPERTS // 2)
    reference_over = hf_reference(all_family_checkpoints()["qwen3_moe"], NUM_EXPERTS // 2 + 1)
    with torch.no_grad():
        for policy, reference in ((half, reference_half), (over_half, reference_over)):
            ours = teacher(input_ids, attention_mask=attention_mask, routing=policy).logits
            theirs = reference(input_ids=input_ids, attention_mask=attention_mask).logits
            assert max_diff_on_tokens(ours, theirs, attention_mask) <= TOLERANCE


# --- outputs beyond logits ------------------------------------------------------------------------


def test_gate_diagnostics_report_unrouted_mass_and_load(teachers):
    teacher = teachers["mixtral"]
    input_ids, attention_mask = padded_batch()
    inputs = []
    handles = [
        b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in teacher.moe_blocks
    ]
    try:
        with torch.no_grad():
            out = teacher(input_ids, attention_mask=attention_mask, return_gate_diagnostics=True)
    finally:
        for h in handles:
            h.remove()
    real = attention_mask.reshape(-1).bool()
    assert [d.layer_index for d in out.gate_diagnostics] == [0, 1]
    for diag, x_BSH, block in zip(out.gate_diagnostics, inputs, teacher.moe_blocks):
        probs_TN = torch.softmax(x_BSH.reshape(-1, 32) @ block.gate.weight.T, dim=-1)[real]
        expected = (1 - probs_TN.topk(teacher.top_k, dim=-1).values.sum(-1)).mean().item()
        assert diag.tokens == int(real.sum())
        assert diag.unrouted_mass_mean == pytest.approx(expected, abs=1e-6)
        assert int(diag.load_N.sum()) == diag.tokens * teacher.top_k


def test_last_hidden_state_feeds_lm_head(teachers):
    teacher = teachers["olmoe"]
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        out = teacher(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        torch.testing.assert_close(teacher.model.lm_head(out.last_hidden_state), out.logits)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_greedy_generation_matches_transformers_generate(teachers, family):
    prompts = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = 0, 0  # left padding
    reference = hf_reference(all_family_checkpoints()[family], None)
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=prompts,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    ours = teacher_generate(teachers[family], prompts, mask, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_ka_draws_do_not_depend_on_padding_or_batch_composition(teachers):
    teacher = teachers["deepseek_v3"]
    policy = KASample(resample_prob=1.0, seed=11, step=3)
    row = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    other = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(9))
    # The row alone (sequence 4), and left-padded to 9 behind another sequence (positions from the mask).
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    batch = torch.cat([other, padded])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        alone = teacher(row, routing=policy, sequence_index=torch.tensor([4])).logits[0]
        both = teacher(
            batch,
            mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            routing=policy,
            sequence_index=torch.tensor([0, 4]),
        ).logits[1, 3:]
        elsewhere = teacher(row, routing=policy, sequence_index=torch.tensor([5])).logits[0]
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    assert (elsewhere - alone).abs().max() > 1e-3  # another sequence index draws differently


def test_batched_draws_equal_separate_draws(teachers):
    teacher = teachers["mixtral"]
    input_ids, attention_mask = padded_batch()
    policy = KASample(resample_prob=0.5, seed=2, step=1)
    with torch.no_grad():
        batched_MBSV = teacher.forward_draws(input_ids, attention_mask, policy, num_draws=2)
        for draw in range(2):
            single = teacher(
                input_ids, attention_mask, routing=policy, draw_index=torch.full((3,), draw)
            ).logits
            assert max_diff_on_tokens(batched_MBSV[draw], single, attention_mask) <= 1e-5
    assert max_diff_on_tokens(batched_MBSV[0], batched_MBSV[1], attention_mask) > 1e-3
