"""Every Triton kernel compiles ahead of time for sm_90 (H100) on a CPU machine: PTX and a cubin from
Triton's bundled ptxas, within the H100's shared memory, with tensor-core MMAs where it multiplies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
H100_SHARED_BYTES = 227 * 1024


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot lower
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "ds_moekd.kernels.aot", "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(proc.stdout)
    assert set(compiled) == {
        "grouped_matmul[swiglu=False]",
        "grouped_matmul[swiglu=True]",
        "swiglu_scale",
        "swiglu_scale_backward",
        "divergence_rows[forward_kl]",
        "divergence_rows[reverse_kl]",
        "divergence_rows[jsd]",
    }
    for name, info in compiled.items():
        assert info["cubin_bytes"] > 0, name
        assert info["shared_bytes"] <= H100_SHARED_BYTES, (name, info)
    assert compiled["grouped_matmul[swiglu=True]"]["tensor_cores"] == "wgmma"
    assert compiled["grouped_matmul[swiglu=False]"]["tensor_cores"] == "wgmma"
