"""Compile every Triton kernel ahead of time for a GPU target, with no GPU or driver present.

`python -m ds_moekd.kernels.aot --arch 90` lowers each kernel at its production configurations
(bf16 data, H100-sized tiles) to PTX and a cubin with Triton's bundled ptxas. The interpreter
accepts kernels that would not compile; this catches them on a CPU machine. Must run without
TRITON_INTERPRET=1 (interpreted kernels cannot be lowered).
"""

from __future__ import annotations

import argparse
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .triton_divergence import KIND_CODES, divergence_rows_kernel
from .triton_grouped_gemm import grouped_matmul_kernel
from .triton_swiglu import swiglu_scale_backward_kernel, swiglu_scale_kernel


def _spec(fn, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    signature = {**types, **{k: "constexpr" for k in constexprs}}
    ordered = {name: signature[name] for name in fn.arg_names}  # ASTSource wants the kernel's order
    return ASTSource(fn=fn, signature=ordered, constexprs=constexprs), {
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def kernel_specs(dtype: str = "bf16") -> dict[str, tuple]:
    """name -> (ASTSource, options) for each kernel variant the wrappers launch."""
    p = f"*{dtype}"
    specs = {}
    for swiglu in (False, True):
        specs[f"grouped_matmul[swiglu={swiglu}]"] = _spec(
            grouped_matmul_kernel,
            {
                "a_ptr": p,
                "b_ptr": p,
                "c_ptr": p,
                "tile_group_ptr": "*i32",
                "tile_row_ptr": "*i32",
                "group_end_ptr": "*i32",
                "num_tiles_ptr": "*i64",
                "N": "i32",
                "K": "i32",
                "n_up_offset": "i32",
                "stride_am": "i32",
                "stride_be": "i32",
                "stride_bk": "i32",
                "stride_cm": "i32",
            },
            {
                "stride_ak": 1,
                "stride_bn": 1,
                "stride_cn": 1,
                "SWIGLU": swiglu,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "BLOCK_M": 128,
                "BLOCK_N": 128,
                "BLOCK_K": 64,
            },
            num_warps=8,
        )
    dense = {"gu_ptr": p, "g_ptr": p, "T": "i32", "E": "i32", "I": "i32"}
    specs["swiglu_scale"] = _spec(swiglu_scale_kernel, {**dense, "a_ptr": p}, {"BLOCK_I": 1024})
    specs["swiglu_scale_backward"] = _spec(
        swiglu_scale_backward_kernel,
        {**dense, "da_ptr": p, "dgu_ptr": p, "dg_ptr": "*fp32"},
        {"BLOCK_I": 1024},
    )
    for kind, code in KIND_CODES.items():
        specs[f"divergence_rows[{kind}]"] = _spec(
            divergence_rows_kernel,
            {
                "s_ptr": p,
                "t_ptr": p,
                "loss_ptr": "*fp32",
                "grad_ptr": "*fp32",
                "V": "i32",
                "stride_s": "i32",
                "stride_t": "i32",
                "stride_g": "i32",
                "inv_t": "fp32",
                "beta": "fp32",
                "log_beta": "fp32",
                "log_1m_beta": "fp32",
            },
            {"KIND": code, "BLOCK_V": 4096},
            num_warps=8,
        )
    return specs


def compile_all(arch: int = 90, dtype: str = "bf16") -> dict[str, dict]:
    """Compile each spec for `cuda:arch`; returns per kernel its cubin size, shared memory and MMA kind."""
    target = GPUTarget("cuda", arch, 32)
    out = {}
    for name, (src, options) in kernel_specs(dtype).items():
        compiled = triton.compile(src, target=target, options=options)
        ptx = compiled.asm["ptx"]
        out[name] = {
            "cubin_bytes": len(compiled.asm["cubin"]),
            "shared_bytes": compiled.metadata.shared,  # must fit the target (H100: 227 KiB per block)
            "tensor_cores": "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else None),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    print(json.dumps(compile_all(args.arch, args.dtype), indent=1))


if __name__ == "__main__":
    main()
