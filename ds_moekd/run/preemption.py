"""Graceful stop on SIGTERM/SIGINT or a lost launcher (docs/reliability.md, "Preemption").

A signal only sets a flag; the training loop asks `StopSignal.agreed()` at each step boundary,
which first checks whether a launcher above this rank is gone (ds_moekd/run/launcher_watch.py), then
all-reduces the flag (MAX) so every rank stops after the same step, even when only one rank got
the signal or lost its launcher. The loop then writes a checkpoint and the command exits with
EXIT_PREEMPTED. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal

from ds_moekd.run.launcher_watch import LauncherWatch
from ds_moekd.runtime.dist import any_rank
from ds_moekd.runtime.telemetry import log

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self, launchers: LauncherWatch | None = None):
        self.signum: int | None = None
        self.reason: str | None = None  # what asked this rank to stop, for the closing message
        self.launchers = launchers or LauncherWatch([])
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, no checkpoint
        self.signum = signum
        self._stop(signal.Signals(signum).name)

    def _stop(self, reason: str) -> None:
        if self.reason is None:
            log.warning("%s: finishing this step, then checkpointing and stopping", reason)
            self.reason = reason

    @property
    def name(self) -> str:
        return self.reason or "a stop on another rank"

    def agreed(self, group) -> bool:
        """Did any rank get a stop signal or lose its launcher? Collective over `group` (None: this
        process alone)."""
        if self.reason is None and (launcher := self.launchers.gone()) is not None:
            self._stop(f"the loss of its launcher, {launcher}")
        return any_rank(self.reason is not None, group)
