"""Name the ranks that are gone when a collective fails (docs/reliability.md, "A node is lost").

A collective that fails because a peer vanished says only "Connection closed by peer" (or times
out, for a node that drops off the network), never which rank. So every rank keeps a heartbeat:
a counter of its own in the job's rendezvous store (MASTER_ADDR:MASTER_PORT, on a separate
client connection), bumped every HEARTBEAT_S by a daemon thread, next to its host and pid. When a
rank's collective fails, it reads the counters twice, a few heartbeats apart: the ranks whose
counter did not move are the lost ones. The store lives in rank 0's process (or torchrun's agent);
when it is gone too, the lost ranks cannot be told apart and the message says so.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from ds_moekd.run.checkpoints import verified
from ds_moekd.run.errors import COLLECTIVE_TIMED_OUT, PEER_CLOSED, PeerLost
from ds_moekd.runtime.dist import ParallelGroups

HEARTBEAT_S = 1.0
_PREFIX = "ds_moekd/peers"


class PeerHeartbeat:
    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ds-moekd-heartbeat", daemon=True)

    @classmethod
    @contextmanager
    def running(cls, groups: ParallelGroups):
        """This rank's heartbeat while the block runs (None in a single process)."""
        if groups.world_size == 1:
            yield None
            return
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        store.set(f"{_PREFIX}/who/{groups.rank}", f"host {socket.gethostname()}, pid {os.getpid()}")
        beat = cls(store, groups.rank, groups.world_size)
        beat._thread.start()
        try:
            yield beat
        finally:
            beat._stop.set()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"{_PREFIX}/beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone with its host; lost_ranks() says so
                return
            self._stop.wait(HEARTBEAT_S)

    def _counters(self) -> list[int]:
        return [self.store.add(f"{_PREFIX}/beat/{r}", 0) for r in range(self.world_size)]

    def lost_ranks(self) -> str:
        """Which ranks stopped beating, as a phrase for a message (takes a few heartbeats)."""
        try:
            before = self._counters()
            time.sleep(3 * HEARTBEAT_S)
            after = self._counters()
            lost = [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]
            who = {r: self.store.get(f"{_PREFIX}/who/{r}").decode() for r in lost}
        except Exception:  # noqa: BLE001 - any failure to reach the store means it went down with its host
            return ("the process holding the job's rendezvous store (rank 0, or torchrun's agent) or its node; "
                    "other lost ranks cannot be named without it")
        if not lost:
            return "no rank: every rank's heartbeat is still going (a slow collective, or a network fault)"
        return ", ".join(f"rank {r} ({who[r]})" for r in lost)


def loss_report(heartbeat: PeerHeartbeat, ckpt_dir: Path) -> str:
    """Who is lost and where to resume from, for the messages of a failed or stalled collective."""
    committed = verified(ckpt_dir) if ckpt_dir.is_dir() else []
    where = (f"the last committed checkpoint is {committed[0][1]}: resume with train.resume=true, on the remaining "
             "ranks too (the global batch is kept)" if committed else
             "no checkpoint was committed yet (train.save_every sets how often): the run starts again")
    return f"lost {heartbeat.lost_ranks()}; {where}"


def lost_peer(heartbeat: PeerHeartbeat, exc: BaseException, ckpt_dir: Path) -> PeerLost:
    cause = next((s for s in COLLECTIVE_TIMED_OUT + PEER_CLOSED if s in str(exc)), type(exc).__name__)
    return PeerLost(f"a collective failed ({cause}): {loss_report(heartbeat, ckpt_dir)}")
