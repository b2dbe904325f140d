"""`ds-moekd bench teacher`: a whole teacher forward, the teacher training runs against transformers'.

The model is transformers' own Mixtral-architecture causal LM at a preset's layer sizes (random
weights; default: 4 LLaMA-MoE-3.5B-sized layers, vocab 32000, 8×512 tokens per rank), with k
experts per token (native top-k, all experts, or N-1 like KA). It is saved once and loaded as the
`MoETeacher` training uses (`MoETeacher.from_pretrained`, expert-parallel over `--ep` local ranks,
each holding N/EP experts and a batch of its own), and timed against transformers' model run with
its eager and grouped_mm experts (all N experts in each process) on the same batch, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .moe_layer import _versions
from .options import is_launched_rank, parse_with_run_options, publish, run_on_local_ranks, start_ranks
from .presets import PRESETS, experts_per_token
from .timing import device_name, time_ms


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
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(device):
        model = MixtralForCausalLM(config).to(dtype).eval()
    return model


def load_ours(model, work: Path, groups, device, dtype):
    """The same weights as the `MoETeacher` training loads: rank 0 saves the checkpoint, every rank
    reads its part of it."""
    from ds_moekd.teacher import MoETeacher

    if groups.rank == 0:
        model.save_pretrained(work)
    if groups.world_size > 1:
        dist.barrier()
    return MoETeacher.from_pretrained(str(work), groups=groups, dtype=dtype, device=device)


def run(preset_name, routing, batch, seq, layers, vocab, heads, device, dtype, warmup, iters, groups=None,
        work: Path | None = None) -> dict:
    from ds_moekd.runtime.dist import ParallelGroups

    groups = groups or ParallelGroups.single()
    model = build_model(preset_name, routing, layers, vocab, heads, device, dtype)
    generator = torch.Generator().manual_seed(1 + groups.rank)  # each rank its own batch
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    timer = {"device": device, "warmup": warmup, "iters": iters}
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        ours = load_ours(model, work or Path(scratch), groups, device, dtype)
    with torch.no_grad():
        ours_logits = ours(input_ids).logits.float()
        if groups.world_size > 1:
            dist.barrier()
        results["ours"] = {"ms": round(time_ms(lambda: ours(input_ids), **timer), 3)}
        for impl in ("eager", "grouped_mm"):
            try:
                model.set_experts_implementation(impl)
                logits[impl] = model(input_ids=input_ids).logits.float()
                results[f"transformers_{impl}"] = {
                    "ms": round(time_ms(lambda: model(input_ids=input_ids), **timer), 3)
                }
            except (RuntimeError, KeyError, ValueError, AttributeError) as err:
                results[f"transformers_{impl}"] = {"not_measured": f"{type(err).__name__}: {err}"}
    for name, ref in logits.items():
        entry = results[f"transformers_{name}"]
        entry["max_abs_logit_diff_vs_ours"] = float(f"{(ref - ours_logits).abs().max().item():.3g}")
        if "ms" in entry:
            entry["ours_speedup"] = round(entry["ms"] / results["ours"]["ms"], 3)
    return {
        "benchmark": "teacher",
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
        "preset": preset_name,
        "routing": routing,
        "ep_size": groups.ep_size,
        "layers": layers,
        "vocab": vocab,
        "batch": batch,  # per rank
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
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None, help="write the result here (rank 0)")
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)  # the ranks' shared checkpoint
    args, opts = parse_with_run_options(parser, argv, gpu_warmup=2, ep=True)
    if opts.ep > 1 and not is_launched_rank():
        with tempfile.TemporaryDirectory() as work:
            argv = sys.argv[1:] if argv is None else list(argv)
            run_on_local_ranks("ds_moekd.bench.teacher_forward", [*argv, "--work", work], opts.ep)
        return
    groups, device = start_ranks(opts)
    result = run(args.preset, args.routing, args.batch, args.seq, args.layers, args.vocab, args.heads, device,
                 opts.dtype, opts.warmup, opts.iters, groups, args.work)
    publish(groups, json.dumps(result, indent=1), result, args.json)


if __name__ == "__main__":
    main()
