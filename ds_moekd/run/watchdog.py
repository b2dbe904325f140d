"""A per-rank watchdog: no silent hangs (docs/reliability.md, "Hangs").

The training loop names what it is doing (`watchdog.phase("teacher forward")`, set through the
step's Stopwatch) and reports progress at every step boundary. A daemon thread wakes up every
few seconds; when neither has happened for `timeout_s`, it prints which rank, which phase and
which step it is stuck in (and, through `explain`, which ranks stopped answering and the last
committed checkpoint) and ends the process with EXIT_HANG. It uses os._exit because the
main thread is blocked inside a collective and never returns to Python to raise anything.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ds_moekd.run.errors import EXIT_HANG

_current: Watchdog | None = None  # the running watchdog, if any (phase() is a no-op without one)
# Phases that may legitimately outlast the limit without a progress report (scoring a whole
# validation set); a hang there is left to the collective timeout.
UNWATCHED = ("validation",)


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, explain=None):
        self.timeout_s, self.rank, self.explain = timeout_s, rank, explain
        self.phase_name, self.step = "start", 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ds-moekd-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        global _current
        if self.timeout_s > 0:
            _current = self
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _current
        self._stop.set()
        if _current is self:
            _current = None

    def progress(self, step: int, phase_name: str) -> None:
        self.step, self.phase_name, self._last = step, phase_name, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s and self.phase_name not in UNWATCHED:
                why = f"{self.explain()}. " if self.explain else "another rank has probably stalled or died. "
                sys.stderr.write(
                    f"\nds-moekd (rank {self.rank}): error: no progress for {idle:.0f} s in phase "
                    f"'{self.phase_name}' (step {self.step}); {why}"
                    f"Exiting with code {EXIT_HANG}; resume from the last checkpoint with train.resume=true "
                    "(train.watchdog_s sets this limit)\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_HANG)


def phase(name: str) -> None:
    """Tell the running watchdog (if any) what this rank is doing now; counts as progress."""
    if _current is not None:
        _current.progress(_current.step, name)
