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
