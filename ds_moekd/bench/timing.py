"""Wall-clock timing of a zero-argument callable (CUDA events on a GPU, perf_counter on CPU), and the
peak memory of one call on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> float:
    """Median milliseconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (CPU peak memory needs Linux)")


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes the process's resident set grew to above its size before `fn()` ran: the kernel's
    high-water mark, reset just before the call. Run it in a fresh process for a clean reading."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - before
