"""What clusters do to a job, tried on real processes (docs/reliability.md): the launcher is
killed under running ranks, and a second job is launched into a live job's run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.rankprocs import REPO, free_port, run_env, run_once, start_ranks, tiny_overrides, wait_for_step

from ds_moekd.run.errors import EXIT_USAGE
from ds_moekd.runtime.telemetry import read_metrics

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CONFIG = str(REPO / "ds_configs/methods/kd.yaml")


def _committed(run: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in (run / "checkpoints").glob("step*") if (p / "manifest.json").is_file())


def _job_processes(marker: Path) -> list[psutil.Process]:
    """Every live process whose command line names `marker` (ranks and launchers of one job)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(marker) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_until_gone(marker: Path, timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := _job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# (launcher command, which of its processes is killed, signal)
LAUNCHER_KILLS = {
    "deepspeed-runner-SIGTERM": ("deepspeed", "runner", signal.SIGTERM),
    "deepspeed-launch.py-SIGKILL": ("deepspeed", "deepspeed.launcher.launch", signal.SIGKILL),
    "torchrun-agent-SIGKILL": ("torchrun", "runner", signal.SIGKILL),
    # the launch script dies without a word (SIGKILL): its mpirun and ranks are left (launcher/signals.sh)
    "mpirun-script-SIGKILL": ("run_ranks mpirun", "runner", signal.SIGKILL),
}


def _launch(launcher: str, overrides: list[str], log: Path) -> subprocess.Popen:
    port = str(free_port())
    head = {"deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", port,
                          "--module", "ds_moekd.train"],
            "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", port, "-m", "ds_moekd.train"],
            "run_ranks mpirun": ["bash", "-c", 'source launcher/signals.sh; run_ranks "$@"', "script",
                                 str(BIN / "mpirun"), "-np", "2", sys.executable, "-m", "ds_moekd.train"]}[launcher]
    with open(log, "w") as out:
        return subprocess.Popen([*head, "--config", CONFIG, *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=run_env({"PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_PORT": port}),
                                start_new_session=True)


@pytest.mark.parametrize("case", sorted(LAUNCHER_KILLS))
def test_a_killed_launcher_makes_the_ranks_checkpoint_and_exit(tiny_demo, tmp_path, case):
    launcher, victim, sig = LAUNCHER_KILLS[case]
    run = tmp_path / "out" / "rel"
    runner = _launch(launcher, tiny_overrides(tiny_demo, tmp_path / "out", steps=100000), tmp_path / "job.log")
    try:
        wait_for_step(run / "metrics.jsonl", 2, [runner])
        target = runner.pid if victim == "runner" else next(
            p.pid for p in psutil.Process(runner.pid).children(recursive=True) if victim in " ".join(p.cmdline()))
        os.kill(target, sig)
        left = _wait_until_gone(tmp_path, timeout_s=180)
    finally:
        for proc in _job_processes(tmp_path):
            proc.kill()
        runner.wait()
    log = (tmp_path / "job.log").read_text()
    assert left == [], log  # no rank and no launcher outlives the stop
    last = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert _committed(run) == [last], log  # both ranks stopped after the same step and committed it
    assert "stopped by the loss of its launcher" in log and log.count(f"after step {last}; checkpoint") == 2, log


def test_one_job_per_run_folder_and_a_killed_holder_is_taken_over(tiny_demo, tmp_path):
    out = tmp_path / "out"
    run = out / "rel"
    one = {"teacher.ep_size": 1}  # single-process jobs: three short ones, the first killed
    holder = start_ranks(tiny_overrides(tiny_demo, out, steps=100000, **{"train.save_every": 1, **one}), world=1,
                         log_dir=tmp_path)
    (tmp_path / "rank0.log").rename(tmp_path / "holder.log")
    try:
        wait_for_step(run / "metrics.jsonl", 2, holder)
        started = time.monotonic()
        codes, text = run_once(tiny_overrides(tiny_demo, out, steps=3, **{"train.resume": "true", **one}), tmp_path,
                               world=1)
        refused_after_s = time.monotonic() - started
        assert holder[0].poll() is None  # the live job was not disturbed
    finally:
        holder[0].kill()  # a crash: the lock is never released by its holder
        holder[0].wait()
    assert codes == [EXIT_USAGE], text
    assert f"{run} is in use by a running job (host " in text and f"pid {holder[0].pid}," in text, text
    assert refused_after_s < 120 and "Traceback" not in text
    last = _committed(run)[-1]
    codes, text = run_once(tiny_overrides(tiny_demo, out, steps=last + 1, **{"train.resume": "true", **one}), tmp_path,
                           world=1)
    assert codes == [0], text
    assert f"the job that held it (host {os.uname().nodename}, pid {holder[0].pid}" in text
    assert "ended without releasing it (killed or crashed); taking it over" in text
    assert (run / "job.lock").read_text() == ""  # released at the end
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == last + 1
