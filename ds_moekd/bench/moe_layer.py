"""`ds-moekd bench moe-layer`: one MoE layer's forward as the teacher runs it, against transformers'.

Ours is the teacher's `ExpertParallelMoE` (router, routing policy, the dense or sparse dispatch that
`takes_dense_path` picks, ds_moekd.kernels experts): in one process at `--ep 1`, or across `--ep`
local ranks (gloo over loopback on CPU), each holding N/EP experts and `--tokens` tokens of its own.
The baseline, timed in the same run on the same tokens and weights, is transformers'
`MixtralSparseMoeBlock` with each of its `experts_implementation`s, all N experts in each process,
its router replaced by the same routing policy (so both use the same experts and weights).

Routing: native top-k, all experts, or KA (N-1 experts of M = `--ka-draws` draws of the tokens,
keyed by draw index, as one batched layer call: T = M·tokens; ours is also timed as M sequential
calls). Reports per implementation the time, the useful expert TFLOP/s (2·T·k·3·H·I for k experts
per token) and the ratio to one plain `[T, H] × [H, 3·k·I]` GEMM of equal FLOPs timed in the same run.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ds_moekd.kernels import choose_backend
from ds_moekd.teacher.dense_dispatch import takes_dense_path
from ds_moekd.teacher.moe_block import ActiveRouting, ExpertParallelMoE
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK

from .implementations import (
    FORCED_BACKENDS,
    TRANSFORMERS_IMPLEMENTATIONS,
    NotMeasured,
    forced_backend,
    our_layer,
    transformers_layer,
)
from .options import is_launched_rank, parse_with_run_options, publish, run_on_local_ranks, start_ranks
from .presets import PRESETS, experts_per_token
from .timing import device_name, time_ms


def routing_policy(routing: str, num_experts: int):
    return {"native": NativeTopK(), "all": AllExperts(), "ka": KASample(num_selected=num_experts - 1, seed=0)}[routing]


def make_weights(preset, device, dtype, seed: int = 0):
    """Router `[N, H]` and expert weights `[N, H, 2I]`, `[N, I, H]`, the same on every rank."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    e, h, i = preset.num_experts, preset.hidden, preset.inter
    gate_NH = torch.randn(e, h, generator=g) / h**0.5
    w_gate_up = torch.randn(e, h, 2 * i, generator=g) / h**0.5
    w_down = torch.randn(e, i, h, generator=g) / i**0.5
    return [w.to(device, dtype) for w in (gate_NH, w_gate_up, w_down)]


def set_routing(ours: ExpertParallelMoE, policy, tokens: int, draws: int, rank: int, device, draw: int | None = None):
    """Keys of `draws` copies of `tokens` tokens (draw-major, as `MoETeacher.forward_draws` stacks
    them), or of draw `draw` alone; every token a sequence of its own, unique across ranks."""
    copies = draws if draw is None else 1
    sequence_T = (rank * tokens + torch.arange(tokens, device=device)).repeat(copies)
    draw_T = (torch.arange(draws, device=device) if draw is None else torch.tensor([draw], device=device))
    ours.active = ActiveRouting(policy=policy, sequence_T=sequence_T, position_T=torch.zeros_like(sequence_T),
                                draw_T=draw_T.repeat_interleave(tokens))


def _time_gemm(x_TH: torch.Tensor, columns: int, timer: dict) -> float:
    """One plain [T, H] x [H, columns] GEMM (its weight freed on return: it can be GiBs)."""
    w = torch.randn(x_TH.shape[1], columns, device=x_TH.device, dtype=x_TH.dtype)
    return time_ms(lambda: x_TH @ w, **timer)


def _entry(ms: float, flops: float, gemm_ms: float) -> dict:
    return {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 3), "ratio_to_gemm": round(gemm_ms / ms, 4)}


def run(preset_name, routing, tokens, ka_draws, dtype, device, warmup, iters, groups=None) -> dict:
    from ds_moekd.runtime.dist import ParallelGroups

    groups = groups or ParallelGroups.single()
    preset = PRESETS[preset_name]
    k = experts_per_token(preset, routing)
    draws = ka_draws if routing == "ka" else 1
    total_tokens = tokens * draws
    weights = make_weights(preset, device, dtype)
    ours = our_layer(preset, weights, groups)
    policy = routing_policy(routing, preset.num_experts)
    # this rank's tokens; KA's draws are copies of them
    x_TH = torch.randn(tokens, preset.hidden, generator=torch.Generator().manual_seed(1 + groups.rank))
    x_TH = x_TH.to(device, dtype).repeat(draws, 1)
    flops = 2.0 * total_tokens * k * 3 * preset.hidden * preset.inter
    timer = {"device": device, "warmup": warmup, "iters": iters}
    set_routing(ours, policy, tokens, draws, groups.rank, device)
    with torch.no_grad():
        gemm_ms = _time_gemm(x_TH, 3 * k * preset.inter, timer)
        builders = {"ours": lambda: ours}
        for backend in FORCED_BACKENDS:
            builders[backend] = lambda backend=backend: forced_backend(ours, backend, device, dtype)
        for impl in TRANSFORMERS_IMPLEMENTATIONS:
            builders[f"transformers_{impl}"] = lambda impl=impl: transformers_layer(preset, weights, k, ours, impl)
        reference = ours(x_TH).float()
        results = {}
        for name, build in builders.items():
            results[name] = _measure(name, build, x_TH, reference, flops, gemm_ms, timer, groups)
        if routing == "ka":
            per_draw = x_TH[:tokens]

            def sequential():
                for d in range(draws):
                    set_routing(ours, policy, tokens, draws, groups.rank, device, draw=d)
                    ours(per_draw)

            results["ours_sequential_draws"] = _entry(time_ms(sequential, **timer), flops, gemm_ms)
        ours.active = None
    measured = {n: r for n, r in results.items() if "ms" in r and n.startswith("transformers_")}
    return {
        "benchmark": "moe-layer",
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
        "preset": preset_name,
        **preset.__dict__,
        "routing": routing,
        "experts_per_token": k,
        "ep_size": groups.ep_size,
        "tokens": total_tokens,  # per rank
        "tokens_per_draw": tokens,
        "ka_draws": ka_draws if routing == "ka" else None,
        "useful_gflop": round(flops / 1e9, 3),
        "ours_path": "dense" if takes_dense_path(k, preset.num_experts) else "sparse",
        "ours_backend": choose_backend(
            "dense_swiglu" if takes_dense_path(k, preset.num_experts) else "grouped_swiglu", device, dtype
        ),
        "gemm": {"ms": round(gemm_ms, 4), "tflops": round(flops / gemm_ms / 1e9, 3)},
        "transformers_fastest": min(measured, key=lambda n: measured[n]["ms"]) if measured else None,
        "implementations": results,
    }


def _measure(name, build, x_TH, reference, flops, gemm_ms, timer, groups) -> dict:
    """Time one implementation; under EP every rank measures the same ones, so their collectives pair up."""
    try:
        fn = build()
        err = (fn(x_TH).float() - reference).abs().max().item() / reference.abs().max().item()
        if groups.ep_size > 1:
            dist.barrier(group=groups.ep_group)  # the timed calls start together
        return {**_entry(time_ms(lambda: fn(x_TH), **timer), flops, gemm_ms), "max_rel_diff_vs_ours": float(f"{err:.3g}")}
    except NotMeasured as reason:
        return {"not_measured": str(reason)}
    except torch.OutOfMemoryError as oom:
        torch.cuda.empty_cache()
        return {"not_measured": f"out of memory: {str(oom).splitlines()[0]}"}


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return versions


def format_table(result: dict) -> str:
    lines = [
        (
            f"{result['preset']} routing={result['routing']} k={result['experts_per_token']} "
            f"({result['ours_path']} path) EP {result['ep_size']}, tokens={result['tokens']} per rank, "
            f"{result['dtype']} on {result['device']}"
        ),
        f"  {'gemm (equal FLOPs)':28s} {result['gemm']['ms']:10.3f} ms {result['gemm']['tflops']:8.2f} TFLOP/s",
    ]
    for name, r in result["implementations"].items():
        if "ms" in r:
            lines.append(
                f"  {name:28s} {r['ms']:10.3f} ms {r['tflops']:8.2f} TFLOP/s  ratio {r['ratio_to_gemm']:.3f}"
            )
        else:
            lines.append(f"  {name:28s} not measured: {r['not_measured']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench moe-layer", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--routing", choices=["native", "all", "ka"], default="native")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (per draw for --routing ka)")
    parser.add_argument("--ka-draws", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the result here (rank 0)")
    args, opts = parse_with_run_options(parser, argv, gpu_warmup=3, ep=True)
    if opts.ep > 1 and not is_launched_rank():
        run_on_local_ranks("ds_moekd.bench.moe_layer", sys.argv[1:] if argv is None else list(argv), opts.ep)
        return
    groups, device = start_ranks(opts)
    result = run(args.preset, args.routing, args.tokens, args.ka_draws, opts.dtype, device, opts.warmup,
                 opts.iters, groups)
    publish(groups, format_table(result), result, args.json)


if __name__ == "__main__":
    main()
