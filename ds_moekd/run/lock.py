"""One job per run folder (docs/reliability.md, "Run folders").

Rank 0 holds an exclusive `flock` on `<run folder>/job.lock` for the whole job and writes its
host, pid and start time into it. A second job that finds the lock held is refused at once,
naming the holder. The kernel drops a lock when its process dies however it dies (also on NFS,
where Linux maps flock to POSIX locks), so a crashed job never leaves it stale: a lock that is
free but still names a holder belonged to a job that ended without releasing it, and the new
job says so and takes it over. A job that ends normally, or with an error, empties the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ds_moekd.run.errors import UserError
from ds_moekd.runtime.dist import ParallelGroups, any_rank
from ds_moekd.runtime.telemetry import log

LOCK_FILE = "job.lock"


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a holder that wrote no details"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _acquire(run_dir: Path) -> tuple[int | None, str]:
    """(the locked file descriptor, "") or (None, why not)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        return None, (f"{run_dir} is in use by a running job ({_describe(holder)}); one job per run folder: wait "
                      "for it to end or stop it, or choose another name/output_dir")
    if previous := _read(fd):
        log.warning("%s: the job that held it (%s) ended without releasing it (killed or crashed); taking it over",
                    run_dir / LOCK_FILE, _describe(previous))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    return fd, ""


@contextmanager
def hold_run_folder(run_dir: Path, groups: ParallelGroups):
    """Hold the run folder for the job (all ranks enter; rank 0 takes the lock), or raise on
    every rank when another live job holds it."""
    fd, refusal = _acquire(run_dir) if groups.rank == 0 else (None, "")
    if any_rank(bool(refusal), groups.world_group):
        raise UserError(refusal or f"{run_dir} is in use by another running job (rank 0's message names it)")
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # released normally: nothing to take over next time
            os.close(fd)
