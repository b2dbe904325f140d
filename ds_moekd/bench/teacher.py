"""`ds-moekd bench teacher`: a whole teacher forward, transformers' experts against ours.

The teacher is transformers' own Mixtral-architecture model at a preset's layer sizes (random
weights; default: 4 LLaMA-MoE-3.5B-sized layers, vocab 32000, 8×512 tokens), run with its eager
and grouped_mm experts, then with its expert modules swapped for ours (`moe_experts`: the dense
path for all-expert / KA routing). Routing: native top-k, all experts, or N-1 experts (KA-like).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ds_moekd.kernels import moe_experts

from .moe_layer import _versions
from .options import parse_with_run_options
from .presets import PRESETS, experts_per_token
from .timing import device_name, time_ms


class OurExperts(nn.Module):
    """Takes transformers' experts call `(hidden, top_k_index, top_k_weights)`; weights in our layout."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.w_gate_up_EHJ = nn.Parameter(
            experts.gate_up_proj.detach().transpose(1, 2).contiguous(), requires_grad=False
        )
        self.w_down_EIH = nn.Parameter(
            experts.down_proj.detach().transpose(1, 2).contiguous(), requires_grad=False
        )

    def forward(self, hidden_TH, top_k_index, top_k_weights):
        return moe_experts(
            hidden_TH, top_k_index, top_k_weights.to(hidden_TH.dtype), self.w_gate_up_EHJ, self.w_down_EIH
        )


def build_model(preset_name: str, routing: str, layers: int, vocab: int, heads: int, device, dtype):
    from transformers import MixtralConfig, MixtralForCausalLM

    preset = PRESETS[preset_name]
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=preset.hidden,
        intermediate_size=preset.inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_local_experts=preset.num_experts,
        num_experts_per_tok=experts_per_token(preset, routing),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = MixtralForCausalLM(config).to(dtype).eval()
    return model


def swap_in_our_experts(model) -> list[tuple[nn.Module, nn.Module]]:
    """Replace each MoE block's experts; returns (block, original) pairs to swap back."""
    swapped = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            swapped.append((module, experts))
            module.experts = OurExperts(experts)
    return swapped


def run(preset_name, routing, batch, seq, layers, vocab, heads, device, dtype, warmup, iters) -> dict:
    model = build_model(preset_name, routing, layers, vocab, heads, device, dtype)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    timer = {"device": device, "warmup": warmup, "iters": iters}
    results, logits = {}, {}
    with torch.no_grad():
        for impl in ("eager", "grouped_mm"):
            try:
                model.set_experts_implementation(impl)
                logits[impl] = model(input_ids=input_ids).logits.float()
                results[f"transformers_{impl}"] = {
                    "ms": round(time_ms(lambda: model(input_ids=input_ids), **timer), 3)
                }
            except (RuntimeError, KeyError, ValueError, AttributeError) as err:
                results[f"transformers_{impl}"] = {"not_measured": f"{type(err).__name__}: {err}"}
        swap_in_our_experts(model)
        ours = model(input_ids=input_ids).logits.float()
        results["ours"] = {"ms": round(time_ms(lambda: model(input_ids=input_ids), **timer), 3)}
    for name, ref in logits.items():
        results[f"transformers_{name}"]["max_abs_logit_diff_vs_ours"] = float(
            f"{(ref - ours).abs().max().item():.3g}"
        )
        if "ms" in results[f"transformers_{name}"]:
            results[f"transformers_{name}"]["ours_speedup"] = round(
                results[f"transformers_{name}"]["ms"] / results["ours"]["ms"], 3
            )
    return {
        "benchmark": "teacher",
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
        "preset": preset_name,
        "routing": routing,
        "layers": layers,
        "vocab": vocab,
        "batch": batch,
        "seq": seq,
        "experts_per_token": experts_per_token(PRESETS[preset_name], routing),
        "implementations": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-moe-3.5b-4of16")
    parser.add_argument("--routing", choices=["native", "all", "ka"], default="all")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args, opts = parse_with_run_options(parser, argv, gpu_warmup=2)
    result = run(
        args.preset,
        args.routing,
        args.batch,
        args.seq,
        args.layers,
        args.vocab,
        args.heads,
        opts.device,
        opts.dtype,
        opts.warmup,
        opts.iters,
    )
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
