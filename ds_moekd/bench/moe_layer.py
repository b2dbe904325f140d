"""`ds-moekd bench moe-layer`: one MoE layer's expert FFN forward, every implementation, one run.

Reports per implementation the time, the useful expert TFLOP/s (2·T·k·3·H·I for k experts per
token) and the ratio to one plain `[T, H] × [H, 3·k·I]` GEMM of equal FLOPs timed in the same run.
With `--routing ka`, T = M·N tokens (M draws of N batched, docs/kernels.md, path 3), and ours is also
timed as M sequential calls of N tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from ds_moekd.kernels import moe_experts
from ds_moekd.kernels.dispatch import DENSE_FRACTION, choose_backend

from .implementations import NotMeasured, implementations
from .options import parse_with_run_options
from .presets import PRESETS, experts_per_token
from .timing import device_name, time_ms


def make_layer(preset, routing: str, tokens: int, device, dtype, seed: int = 0):
    """Weights, inputs and a routing (softmax over the chosen router logits) for `tokens` tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    e, h, i = preset.num_experts, preset.hidden, preset.inter
    w_gate_up = (torch.randn(e, h, 2 * i, generator=g) / h**0.5).to(device, dtype)
    w_down = (torch.randn(e, i, h, generator=g) / i**0.5).to(device, dtype)
    x = torch.randn(tokens, h, generator=g).to(device, dtype)
    logits = torch.randn(tokens, e, generator=g).to(device)
    top_logits, ids = logits.topk(experts_per_token(preset, routing), dim=-1)
    return w_gate_up, w_down, x, ids, torch.softmax(top_logits, -1).to(dtype)


def _time_gemm(x_TH: torch.Tensor, columns: int, timer: dict) -> float:
    """One plain [T, H] x [H, columns] GEMM (its weight freed on return: it can be GiBs)."""
    w = torch.randn(x_TH.shape[1], columns, device=x_TH.device, dtype=x_TH.dtype)
    return time_ms(lambda: x_TH @ w, **timer)


def _entry(ms: float, flops: float, gemm_ms: float) -> dict:
    return {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 3), "ratio_to_gemm": round(gemm_ms / ms, 4)}


def run(
    preset_name: str,
    routing: str,
    tokens: int,
    ka_draws: int,
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    iters: int,
) -> dict:
    preset = PRESETS[preset_name]
    k = experts_per_token(preset, routing)
    total_tokens = tokens * (ka_draws if routing == "ka" else 1)
    w_gate_up, w_down, x, ids, weights = make_layer(preset, routing, total_tokens, device, dtype)
    flops = 2.0 * total_tokens * k * 3 * preset.hidden * preset.inter
    timer = {"device": device, "warmup": warmup, "iters": iters}
    with torch.no_grad():
        gemm_ms = _time_gemm(x, 3 * k * preset.inter, timer)
        reference = moe_experts(x, ids, weights, w_gate_up, w_down).float()
        results = {}
        for name, build in implementations(w_gate_up, w_down).items():
            try:
                fn = build()
                err = (
                    fn(x, ids, weights).float() - reference
                ).abs().max().item() / reference.abs().max().item()
                results[name] = {
                    **_entry(time_ms(lambda fn=fn: fn(x, ids, weights), **timer), flops, gemm_ms),
                    "max_rel_diff_vs_ours": float(f"{err:.3g}"),
                }
            except NotMeasured as reason:
                results[name] = {"not_measured": str(reason)}
            except torch.OutOfMemoryError as oom:
                results[name] = {"not_measured": f"out of memory: {str(oom).splitlines()[0]}"}
                torch.cuda.empty_cache()
        if routing == "ka":
            draws = [(x[d::ka_draws], ids[d::ka_draws], weights[d::ka_draws]) for d in range(ka_draws)]
            seq_ms = time_ms(lambda: [moe_experts(*draw, w_gate_up, w_down) for draw in draws], **timer)
            results["ours_sequential_draws"] = _entry(seq_ms, flops, gemm_ms)
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
        "tokens": total_tokens,
        "tokens_per_draw": tokens,
        "ka_draws": ka_draws if routing == "ka" else None,
        "useful_gflop": round(flops / 1e9, 3),
        "ours_path": "dense" if k >= DENSE_FRACTION * preset.num_experts else "sparse",
        "ours_backend": choose_backend("moe_experts", device, dtype),
        "gemm": {"ms": round(gemm_ms, 4), "tflops": round(flops / gemm_ms / 1e9, 3)},
        "transformers_fastest": min(measured, key=lambda n: measured[n]["ms"]) if measured else None,
        "implementations": results,
    }


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
            f"tokens={result['tokens']} {result['dtype']} on {result['device']}"
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
    parser.add_argument("--tokens", type=int, default=4096, help="tokens (per draw for --routing ka)")
    parser.add_argument("--ka-draws", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args, opts = parse_with_run_options(parser, argv, gpu_warmup=3)
    result = run(
        args.preset, args.routing, args.tokens, args.ka_draws, opts.dtype, opts.device, opts.warmup, opts.iters
    )
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
