"""The command-line options every benchmark shares: --device, --dtype, --warmup, --iters, --threads,
and for the benchmarks of the expert-parallel teacher --ep (its EP size: that many local ranks).

Their defaults depend on the device chosen, so they parse as None and are filled in afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RunOptions:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    iters: int
    ep: int = 1


def parse_with_run_options(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, gpu_warmup: int, ep: bool = False
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
    if ep:
        parser.add_argument(
            "--ep", type=int, default=1,
            help="expert-parallel size: >1 starts that many local ranks (gloo over loopback on CPU, one GPU each)",
        )
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
        ep=getattr(args, "ep", 1),
    )


def is_launched_rank() -> bool:
    """Whether this process is one rank of a multi-rank launch (`run_on_local_ranks`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_on_local_ranks(module: str, argv: list[str], ranks: int) -> None:
    """Run `python -m module argv` as `ranks` local ranks (torch.distributed.run, loopback only) and
    wait; rank 0 prints and writes the result. CPU ranks share the cores: each gets its share as
    intra-op threads unless OMP_NUM_THREADS is set."""
    from ds_moekd.runtime.dist import free_loopback_port

    port = str(free_loopback_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    if not torch.cuda.is_available():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", port, "-m", module, *argv]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{module}: the {ranks} local ranks failed (exit {proc.returncode})")


def start_ranks(opts: RunOptions):
    """(ParallelGroups, this rank's device): one process, or one rank of `run_on_local_ranks`."""
    from ds_moekd.runtime.dist import ParallelGroups, init_distributed

    if opts.ep == 1:
        return ParallelGroups.single(), opts.device
    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if opts.device.type == "cuda" else opts.device
    return ParallelGroups.create(ep_size=opts.ep), device


def publish(groups, text: str, result: dict, json_path) -> None:
    """Rank 0 prints `text` and writes `result` to `json_path` (if given); then the ranks finish."""
    if groups.rank == 0:
        print(text)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1) + "\n")
    if groups.world_size > 1:
        from ds_moekd.runtime.dist import shutdown

        shutdown()
