"""Notice that the launcher above a rank is gone (docs/reliability.md, "The launcher dies").

Launchers do not take their ranks with them: SIGTERM to `deepspeed`'s runner leaves its per-node
launch.py and the ranks running, SIGKILL to launch.py or to torchrun's agent leaves the ranks
running, and a killed script leaves its `mpirun` running. Such ranks would train on, unwatched,
and never checkpoint. So each rank records, at start, the launcher processes above it (the
unbroken chain of known launchers from its parent up), plus the launch script that `run_ranks`
names in DS_MOEKD_WATCH_PID (launcher/signals.sh), each by pid and start time. The training loop
asks `gone()` at every step boundary; a launcher that exited, was killed, or is a zombie counts
as gone, and the rank then stops like on SIGTERM: the ranks agree, checkpoint and exit with 75.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

WATCH_PID_ENV = "DS_MOEKD_WATCH_PID"  # set by run_ranks: the launch script's pid
# Module names and program names that identify a launcher process in its command line.
_LAUNCHER_MODULES = {"deepspeed.launcher.runner": "deepspeed runner", "deepspeed.launcher.launch": "deepspeed launch.py",
                     "torch.distributed.run": "torchrun", "torch.distributed.launch": "torch.distributed.launch"}
_LAUNCHER_PROGRAMS = {"deepspeed": "deepspeed runner", "torchrun": "torchrun", "mpirun": "mpirun",
                      "mpiexec": "mpiexec", "mpiexec.hydra": "mpiexec", "hydra_pmi_proxy": "MPICH hydra proxy",
                      "orted": "Open MPI orted", "prted": "Open MPI prted", "prterun": "Open MPI prterun"}


@dataclass(frozen=True)
class Launcher:
    pid: int
    started: float  # psutil's create_time: a reused pid is another process
    what: str

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def __str__(self) -> str:
        return f"{self.what} (pid {self.pid})"


def launcher_name(cmdline: list[str]) -> str | None:
    """What kind of launcher a command line runs, or None when it is not one."""
    for arg in cmdline[:5]:  # the program, or the interpreter, its options and its script or `-m module`
        module = arg[:-3].replace("/", ".") if arg.endswith(".py") else arg
        what = next((w for name, w in _LAUNCHER_MODULES.items() if module.endswith(name)), None)
        if what or Path(arg).name in _LAUNCHER_PROGRAMS:
            return what or _LAUNCHER_PROGRAMS[Path(arg).name]
    return None


class LauncherWatch:
    def __init__(self, launchers: list[Launcher]):
        self.launchers = launchers

    @classmethod
    def of_this_process(cls) -> LauncherWatch:
        """The launchers above this process: ancestors that are launchers, from the parent up,
        and the launch script named in DS_MOEKD_WATCH_PID when it is an ancestor."""
        script = int(os.environ.get(WATCH_PID_ENV) or 0)
        launchers = []
        try:
            ancestors = psutil.Process().parents()
        except psutil.Error:
            return cls([])
        in_launcher_chain = True
        for proc in ancestors:
            try:
                what = launcher_name(proc.cmdline())
                if proc.pid == script:
                    what = "launch script"
                elif not (what and in_launcher_chain):
                    in_launcher_chain = False
                    continue
                launchers.append(Launcher(proc.pid, proc.create_time(), what))
            except psutil.Error:
                in_launcher_chain = False
        return cls(launchers)

    def gone(self) -> Launcher | None:
        """The first watched launcher that is no longer running, if any."""
        return next((launcher for launcher in self.launchers if not launcher.alive()), None)

    def __str__(self) -> str:
        return ", ".join(map(str, self.launchers)) or "no launcher"
