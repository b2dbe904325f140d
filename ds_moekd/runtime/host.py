"""Per-process settings for CPU runs, applied at the start of training and evaluation.

- Intra-op threads: each process takes its share of the cores, `cores // local ranks`, as
  launcher/quickstart.sh does for two ranks (torch would otherwise start a thread per core in every
  rank, and ranks, or other work on a shared host, oversubscribe the cores). OMP_NUM_THREADS, when
  set, wins.
- `LOCAL_SIZE`: DeepSpeed's CPU accelerator counts its devices with `numactl --hardware` in a
  subprocess on every call unless LOCAL_SIZE is set, and ZeRO-3 asks once per step. Each such
  subprocess also resets Python's warning registry, so a deprecation warning raised inside the step
  was printed again on every step. Generation and peft reset that registry too (at every
  validation), so the deprecation warnings of the collectives DeepSpeed calls (torch's
  `all_gather_into_tensor`, `reduce_scatter_tensor`: nothing a user can act on) are not shown.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch


def configure_process() -> str:
    """Apply the settings above; returns a line for the log."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    os.environ.setdefault("LOCAL_SIZE", str(local_ranks))
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} intra-op threads (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_ranks))
    return f"{torch.get_num_threads()} intra-op threads ({cores} cores, {local_ranks} local rank(s); " \
           "set OMP_NUM_THREADS to choose)"


def numerics_facts() -> dict:
    """What decides a CPU run's rounding besides the code and the package versions: the CPU, the
    vector code paths torch and MKL take (launcher/env.sh pins them) and the intra-op threads."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "intra_op_threads": torch.get_num_threads(),
    }
