"""The command-line options every benchmark shares: --device, --dtype, --warmup, --iters, --threads.

Their defaults depend on the device chosen, so they parse as None and are filled in afterwards.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RunOptions:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    iters: int


def parse_with_run_options(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, gpu_warmup: int
) -> tuple[argparse.Namespace, RunOptions]:
    """Add the shared options to `parser`, parse `argv`, and resolve their defaults for the device.

    Defaults: bfloat16 on a GPU and float32 on CPU; `gpu_warmup` warm-up calls on a GPU, 1 on CPU;
    10 timed calls on a GPU, 3 on CPU. `--threads` sets torch's CPU threads before anything runs.
    """
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: bfloat16 on a GPU, float32 on CPU",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None, help=f"default: {gpu_warmup} on a GPU, 1 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="default: 10 on a GPU, 3 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    return args, RunOptions(
        device=device,
        dtype=getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32")),
        warmup=args.warmup if args.warmup is not None else (gpu_warmup if on_gpu else 1),
        iters=args.iters if args.iters is not None else (10 if on_gpu else 3),
    )
