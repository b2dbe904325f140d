"""Per-step metrics: timers, peak memory, and the rank-0 `metrics.jsonl` writer."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import threading
import time
from pathlib import Path

import torch

from ds_moekd.run import watchdog

log = logging.getLogger("ds_moekd")


def setup_logging(rank: int) -> None:
    """Rank 0 logs progress to stderr; other ranks only warnings (they would repeat it)."""
    logging.basicConfig(format="[ds-moekd %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


HEARTBEAT_S = 15.0


@contextlib.contextmanager
def phase(name: str, hint: str = ""):
    """Say when a start-up or wind-down phase starts (with `hint`, what may take long in it), that it is
    still running every HEARTBEAT_S seconds, and how long it took (such phases dominate short runs)."""
    start = time.perf_counter()
    log.info("%s ...%s", name, f" ({hint})" if hint else "")
    done = threading.Event()

    def heartbeat():
        while not done.wait(HEARTBEAT_S):
            log.info("%s: still running, %.0f s so far", name, time.perf_counter() - start)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log.info("%s: %.1f s", name, time.perf_counter() - start)


def peak_memory_mb() -> float:
    """Peak accelerator memory where there is one, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


_PHASE_NAMES = {"teacher_s": "teacher forward", "student_s": "student forward/backward/step",
                "rollout_s": "rollout", "router_s": "router step", "teacher_generate_s": "teacher generation"}


class Stopwatch:
    """Accumulates wall time of named phases within one step."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def time(self, name: str):
        watch = self

        class _Span:
            def __enter__(self):
                watchdog.phase(_PHASE_NAMES.get(name, name))  # what a stalled rank is named as doing
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch.totals[name] = watch.totals.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


class MetricsWriter:
    """Appends one JSON object per step (rank 0 only; other ranks pass enabled=False).

    A fresh run starts an empty file; a resumed one keeps the lines up to its checkpoint's step
    and drops any logged after it (those steps are trained again).
    """

    def __init__(self, path: Path, enabled: bool, keep_steps_upto: int = 0):
        self._file = None
        if enabled:
            kept = [m for m in read_metrics(path) if m["step"] <= keep_steps_upto] if path.exists() else []
            self._file = path.open("w", buffering=1)
            for record in kept:
                self.write(record)

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of `path`; a half-written last line (a crash mid-write) is dropped with a warning."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not valid JSON (only a half-written last line is skipped)") from None
            log.warning("%s:%d: dropping a half-written last line", path, i + 1)
    return records


FINAL_LOSS = "final loss (mean over the last tenth of logged steps)"


def tenth(metrics: list) -> int:
    return max(1, len(metrics) // 10)


def final_loss(metrics: list[dict]) -> float:
    """The one definition of a run's final loss (run report and `ds-moekd report`): one step is noisy."""
    last = metrics[-tenth(metrics):]
    return sum(m["loss"] for m in last) / len(last)
