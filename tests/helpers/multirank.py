"""A pool of persistent CPU ranks for multi-rank tests.

Spawning ranks (and importing torch/deepspeed in each) costs seconds, so a test session starts
`world_size` worker processes once and runs many test functions on them. Each worker owns a
gloo process group over loopback; the environment looks like a torchrun launch, so a later
`deepspeed.init_distributed()` inside a task finds the existing group and reuses it.

    pool = RankPool(2)
    results = pool.run(my_module_level_fn, arg, key=value)   # one result per rank, by rank

A task that raises on any rank raises `RankError` in the parent with that rank's traceback.
A task that does not finish within the timeout (a hung collective) raises `RankTimeout`.
After either, the workers may be stuck in a collective, so the pool restarts them before the
next task: one failing test never poisons the ones after it.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from typing_extensions import Self

_START_TIMEOUT_S = 120.0
# After one rank fails, how long the others get to report before they count as stuck
# (they usually wait in a collective for the rank that failed).
_FAILURE_GRACE_S = 2.0


class RankError(RuntimeError):
    """A task raised on one or more ranks."""


class RankTimeout(RuntimeError):
    """A task did not finish on every rank in time."""


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, timeout_s: float, conn) -> None:
    """Body of one rank: set the launch environment, join the group, serve tasks until told to stop."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except BaseException:  # noqa: BLE001 - any failure must reach the parent, not kill the rank silently
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # parent went away
            break
        if task is None:
            break
        fn, args, kwargs = task
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - the task's failure is the reply
            reply = ("error", traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - the result itself could not be pickled
            message = f"rank {rank}: result of {fn.__qualname__} is not picklable:\n{traceback.format_exc()}"
            conn.send(("error", message))
    dist.destroy_process_group()


class RankPool:
    """`world_size` persistent worker processes joined in one gloo process group on 127.0.0.1."""

    def __init__(self, world_size: int, *, timeout_s: float = 120.0):
        if world_size < 1:
            raise ValueError(f"RankPool(world_size={world_size}): need at least one rank")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._conns: list = []
        self._start()

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self) -> None:
        port = _free_loopback_port()
        for rank in range(self.world_size):
            parent_conn, child_conn = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, self.timeout_s, child_conn),
                name=f"rank-pool-{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        replies = self._collect(timeout_s=_START_TIMEOUT_S, what="process-group start")
        if any(status != "ready" for status, _ in replies):
            self.close()
            raise RankError("rank pool failed to start:\n" + _format_errors(replies))

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, EOFError, BrokenPipeError):
                pass
        self._reap(grace_s=5.0)

    def _restart(self) -> None:
        self._reap(grace_s=0.0)
        self._start()

    def _reap(self, grace_s: float) -> None:
        """Wait up to `grace_s` in all for the workers to exit, kill the rest, drop the pipes."""
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tasks -----------------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args, timeout_s: float | None = None, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the results ordered by rank.

        `fn` must be a module-level function (it is pickled by reference); arguments and results
        must be picklable. `timeout_s` overrides the pool's timeout for this task.
        """
        if not self._procs:
            raise RuntimeError("RankPool.run after close(): create a new RankPool")
        try:
            task = pickle.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(
                f"RankPool.run({getattr(fn, '__qualname__', fn)!r}): the task is not picklable ({exc}); "
                "pass a module-level function and picklable arguments"
            ) from exc
        for conn in self._conns:
            conn.send_bytes(task)  # recv() on the worker side unpickles it
        what = getattr(fn, "__qualname__", repr(fn))
        replies = self._collect(timeout_s=self.timeout_s if timeout_s is None else timeout_s, what=what)
        statuses = {status for status, _ in replies}
        if statuses == {"ok"}:
            return [value for _, value in replies]
        self._restart()  # survivors may be stuck in a collective with the failed rank
        if statuses <= {"ok", "timeout"}:
            raise RankTimeout(
                f"{what}: "
                + "; ".join(msg for status, msg in replies if status == "timeout")
                + " (a hung collective? raise timeout_s if the task is just slow)"
            )
        raise RankError(f"{what} failed:\n" + _format_errors(replies))

    def _collect(self, *, timeout_s: float, what: str) -> list[tuple[str, Any]]:
        """Wait for one reply per rank; a rank that does not answer gets ("timeout", message)."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size:
            pending = {self._conns[r]: r for r in range(self.world_size) if r not in replies}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in mp_connection.wait(list(pending), timeout=min(remaining, 1.0)):
                rank = pending[conn]
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    code = self._procs[rank].exitcode
                    replies[rank] = ("died", f"rank {rank} exited (exit code {code}) during {what}")
            if any(status != "ok" and status != "ready" for status, _ in replies.values()):
                # One rank failed: the others get a short grace, then count as stuck.
                deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
        failed_any = any(status not in ("ok", "ready") for status, _ in replies.values())
        for rank in range(self.world_size):
            if rank not in replies:
                state = (
                    "stuck waiting (likely in a collective with a failed rank)"
                    if failed_any
                    else f"did not finish within {timeout_s:.0f}s"
                )
                replies[rank] = ("timeout", f"rank {rank} {state} during {what}")
        return [replies[r] for r in range(self.world_size)]


def _format_errors(replies: list[tuple[str, Any]]) -> str:
    parts = []
    for rank, (status, payload) in enumerate(replies):
        if status in ("ok", "ready"):
            continue
        parts.append(f"--- rank {rank} ({status}) ---\n{payload}")
    return "\n".join(parts)
