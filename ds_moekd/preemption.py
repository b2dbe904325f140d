"""Graceful stop on SIGTERM/SIGINT (docs/reliability.md, "Preemption").

A signal only sets a flag; the training loop asks `StopSignal.agreed()` at each step boundary,
which all-reduces the flag (MAX) so every rank stops after the same step, even when only one
rank got the signal. The loop then writes a checkpoint and the command exits with
EXIT_PREEMPTED. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal

from ds_moekd.dist import any_rank
from ds_moekd.telemetry import log

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self):
        self.signum: int | None = None
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
        if self.signum is None:
            log.warning("received %s: finishing this step, then checkpointing and stopping",
                        signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def agreed(self, group) -> bool:
        """Did any rank get a stop signal? Collective over `group` (None: this process alone)."""
        return any_rank(self.signum is not None, group)

