"""Long phases say what they are doing: a start line, a heartbeat while they run, the time they took."""

from __future__ import annotations

import logging
import time

from ds_moekd.runtime import telemetry


def test_a_phase_announces_itself_and_reports_while_it_runs(caplog, monkeypatch):
    monkeypatch.setattr(telemetry, "HEARTBEAT_S", 0.01)
    with caplog.at_level(logging.INFO, logger="ds_moekd"):
        with telemetry.phase("teacher load", "reads every expert"):
            assert caplog.messages == ["teacher load ... (reads every expert)"]
            deadline = time.monotonic() + 30
            while not any("still running" in m for m in caplog.messages) and time.monotonic() < deadline:
                time.sleep(0.01)
    assert any(m.startswith("teacher load: still running") for m in caplog.messages)
    assert caplog.messages[-1].startswith("teacher load: ") and caplog.messages[-1].endswith(" s")
    count = len(caplog.messages)
    time.sleep(0.05)
    assert len(caplog.messages) == count  # the heartbeat stops with the phase
