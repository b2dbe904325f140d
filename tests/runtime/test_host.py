"""Per-process CPU settings (ds_moekd/runtime/host.py) and a one-process run's console: no per-step warnings."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

PROBE = """
import subprocess, torch
from ds_moekd.runtime.host import configure_process
line = configure_process()
def no_subprocess(*a, **k):
    raise AssertionError(f"subprocess {a}")
subprocess.check_output = no_subprocess  # DeepSpeed's CPU accelerator must not shell out to numactl
from deepspeed.accelerator import get_accelerator
print(torch.get_num_threads(), get_accelerator().device_count(), line)
"""


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_SIZE", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "DS_ACCELERATOR": "cpu", **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]), " ".join(out[2:])


@pytest.mark.slow
def test_threads_are_the_cores_shared_by_the_local_ranks():
    cores = len(os.sched_getaffinity(0))
    assert probe()[:2] == (cores, 1)
    assert probe(LOCAL_WORLD_SIZE="2")[:2] == (max(1, cores // 2), 2)
    threads, _, line = probe(OMP_NUM_THREADS="1")
    assert threads == 1 and "OMP_NUM_THREADS" in line


@pytest.mark.slow
def test_one_process_training_prints_no_warning_twice(tiny_demo, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_SIZE", None)
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(
        [sys.executable, "-m", "ds_moekd.cli", "train", "--config", str(REPO / "ds_configs/methods/kd.yaml"),
         "name=warn", f"output_dir={tmp_path}", "train.steps=6", "data.micro_batch_size=2", "teacher.ep_size=1",
         f"data.train_file={tiny_demo}/data/train.jsonl", f"data.valid_file={tiny_demo}/data/valid.jsonl",
         f"teacher.path={tiny_demo}/teacher", f"student.path={tiny_demo}/student", "report.eval_examples=0",
         f"student.deepspeed_config={REPO}/ds_configs/zero3_cpu.json", "validation.every=2",
         "validation.examples=2", "validation.max_new_tokens=2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.replace("\r", "\n").splitlines()
    warnings = collections.Counter(line[line.index("Warning"):] for line in lines if "Warning:" in line)
    assert all(n == 1 for n in warnings.values()), warnings
    assert any("intra-op threads" in line for line in lines)


def test_the_launch_environment_pins_the_cpu_code_paths():
    """tests/run.sh sources launcher/env.sh, which pins torch's and MKL's CPU code paths to AVX2 on
    CPUs that have it (docs/install.md, "Reproducible runs"); run.json records what was in force."""
    from ds_moekd.runtime.host import numerics_facts

    facts = numerics_facts()
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        assert facts["torch_cpu_capability"] == "AVX2" and facts["mkl_cbwr"] == "AVX2"
    else:
        assert os.environ.get("DS_MOEKD_CPU_ISA") == "native" or "avx2" not in open("/proc/cpuinfo").read(), \
            "launcher/env.sh did not pin the CPU code paths on an AVX2 CPU"
    assert facts["intra_op_threads"] == torch.get_num_threads() and facts["cpu"]
