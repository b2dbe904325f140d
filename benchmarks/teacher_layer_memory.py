"""Peak memory of one all-expert (AllExperts, dense dispatch) MoE layer forward against the token count.

Each token count runs in a fresh process: build one `ExpertParallelMoE` (EP 1, torch reference
experts), reset the kernel's resident-set high-water mark (/proc/self/clear_refs), run the forward
under no_grad and read the high-water mark back. The extra memory should grow linearly in tokens
(activations of [T, 2I] per expert, [T, N] gate weights); a tokens x tokens x experts dispatch mask
(DeepSpeed's MOELayer) would grow quadratically — its size is printed beside for comparison.

    python benchmarks/teacher_layer_memory.py [--tokens 1024 2048 4096 8192 16384] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HIDDEN, EXPERTS, WIDTH = 512, 16, 256


def measure(tokens: int) -> dict:
    import torch

    from ds_moekd.bench.timing import cpu_peak_bytes
    from ds_moekd.runtime.dist import ParallelGroups
    from ds_moekd.teacher.moe_block import ActiveRouting, ExpertParallelMoE
    from ds_moekd.teacher.routers import LinearRouter
    from ds_moekd.teacher.routing import AllExperts, RouterSpec

    torch.manual_seed(0)
    torch.set_num_threads(1)
    gate = LinearRouter(EXPERTS, HIDDEN, fp32=False, correction_bias=False, dtype=torch.float32)
    gate.weight.data.normal_()
    block = ExpertParallelMoE(
        layer_index=0,
        router=RouterSpec(EXPERTS, 4, renormalize=True),
        gate=gate,
        w_gate_up_EHJ=torch.randn(EXPERTS, HIDDEN, 2 * WIDTH) * 0.05,
        w_down_EIH=torch.randn(EXPERTS, WIDTH, HIDDEN) * 0.05,
        groups=ParallelGroups.single(),
    )
    x_BSH = torch.randn(1, tokens, HIDDEN)
    zeros_T = torch.zeros(tokens, dtype=torch.long)
    block.active = ActiveRouting(AllExperts(), zeros_T, torch.arange(tokens), zeros_T)
    with torch.no_grad():
        block(x_BSH[:, :8])  # warm up lazy allocations outside the measured window
        outputs = []
        peak_extra = cpu_peak_bytes(lambda: outputs.append(block(x_BSH)))
    (out_BSH,) = outputs
    assert out_BSH.shape == x_BSH.shape
    return {
        "tokens": tokens,
        "peak_extra_bytes": peak_extra,
        "output_bytes": out_BSH.numel() * out_BSH.element_size(),
        "deepspeed_mask_bytes": tokens * tokens * EXPERTS * 4,  # a [T, E, T] fp32 dispatch mask, for contrast
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for tokens in args.tokens:
        # A fixed mmap threshold: glibc otherwise raises it after the first large free and serves later
        # tensors from a heap that never shrinks, so the high-water mark would stop tracking live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(tokens)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    lines = [
        f"# One all-expert MoE layer forward: peak extra memory vs tokens (H={HIDDEN}, {EXPERTS} experts of {WIDTH}, fp32, CPU)",
        "",
        "| tokens | peak extra MB | MB per 1k tokens | ratio to first / token ratio | [T,E,T] mask MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        growth = (row["peak_extra_bytes"] / base["peak_extra_bytes"]) / (row["tokens"] / base["tokens"])
        lines.append(
            f"| {row['tokens']} | {row['peak_extra_bytes'] / 2**20:.1f} | "
            f"{row['peak_extra_bytes'] / 2**20 / (row['tokens'] / 1000):.2f} | {growth:.2f} | "
            f"{row['deepspeed_mask_bytes'] / 2**20:.0f} |"
        )
    report = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "teacher_layer_memory.json"), "w") as f:
        json.dump({"hidden": HIDDEN, "experts": EXPERTS, "width": WIDTH, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "teacher_layer_memory.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
