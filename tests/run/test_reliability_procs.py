"""Faults tried on real training jobs (docs/reliability.md): every rank is its own process, started
as a launcher starts it; the tests send real signals, stop ranks, corrupt files and fill a disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.rankprocs import (
    REPO,
    free_port,
    run_env,
    run_once,
    start_ranks,
    stop,
    tiny_overrides,
    wait_all,
    wait_for_step,
)

from ds_moekd.config import load_config
from ds_moekd.run.errors import EXIT_ENVIRONMENT, EXIT_HANG, EXIT_NUMERICS, EXIT_PREEMPTED, EXIT_USAGE
from ds_moekd.runtime.telemetry import read_metrics

pytestmark = pytest.mark.slow


def _committed(run: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in (run / "checkpoints").glob("step*") if (p / "manifest.json").is_file())


def _tree_digest(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tiny_demo, tmp_path_factory):
    """A finished 3-step run; tests copy it (`_copy_run`) before changing anything."""
    out = tmp_path_factory.mktemp("good")
    codes, text = run_once(tiny_overrides(tiny_demo, out / "out", steps=3), out)
    assert codes == [0, 0], text
    return out / "out"


def _copy_run(good_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(good_run, tmp_path / "out")
    return tmp_path / "out"


# -- preemption -------------------------------------------------------------------------------


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tiny_demo, tmp_path):
    run = tmp_path / "out" / "rel"
    procs = start_ranks(tiny_overrides(tiny_demo, tmp_path / "out", steps=100000), log_dir=tmp_path)
    wait_for_step(run / "metrics.jsonl", 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # only one rank gets it: they must still agree
    codes = wait_all(procs, timeout_s=120)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    last = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert _committed(run) == [last]  # both ranks stopped after the same step and committed it
    assert all("stopped by" in log and f"after step {last}" in log and "train.resume=true" in log for log in logs)
    assert "Traceback" not in logs[0] + logs[1]
    # the stopped run resumes from there to its end
    codes, text = run_once(tiny_overrides(tiny_demo, tmp_path / "out", steps=last + 2, **{"train.resume": "true"}),
                           tmp_path)
    assert codes == [0, 0], text
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, last + 3))


LAUNCHERS = {
    "deepspeed": "deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port $MASTER_PORT --module ds_moekd.train",
    "mpirun": "mpirun -np 2 python -m ds_moekd.train",
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sigterm_to_the_launch_script_reaches_the_ranks_and_leaves_no_process(tiny_demo, tmp_path, launcher):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / launcher).exists():
        pytest.skip(f"no {launcher} in this environment")
    overrides = " ".join(tiny_overrides(tiny_demo, tmp_path / "out", steps=100000))
    # what the launch scripts do (they also run setup.sh, which the tests must not)
    script = (f"set -euo pipefail; source launcher/signals.sh; "
              f"run_ranks {LAUNCHERS[launcher]} --config ds_configs/methods/kd.yaml {overrides}")
    env = run_env({"MASTER_PORT": str(free_port()), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    with open(tmp_path / "launcher.log", "w") as log:
        script_proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    run = tmp_path / "out" / "rel"
    try:
        wait_for_step(run / "metrics.jsonl", 3, [script_proc])
        ranks = [int(p) for p in subprocess.run(["pgrep", "-f", f"ds_moekd.train.*{tmp_path}"],
                                                capture_output=True, text=True).stdout.split()]
        script_proc.send_signal(signal.SIGTERM)
        code = script_proc.wait(timeout=180)
    finally:
        if script_proc.poll() is None:
            os.killpg(script_proc.pid, signal.SIGKILL)
    text = (tmp_path / "launcher.log").read_text()
    assert code == EXIT_PREEMPTED, text
    assert "stopped by SIGTERM" in text
    assert _committed(run) == [read_metrics(run / "metrics.jsonl")[-1]["step"]]
    alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists()
             and "ds_moekd.train" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert len(ranks) >= 2 and alive == [], text  # no orphaned rank or launcher (both match the pattern)


# -- hangs ------------------------------------------------------------------------------------


def test_a_stopped_rank_makes_the_other_exit_naming_its_rank_and_phase(tiny_demo, tmp_path):
    run = tmp_path / "out" / "rel"
    procs = start_ranks(tiny_overrides(tiny_demo, tmp_path / "out", steps=100000,
                                       **{"train.watchdog_s": 6, "train.collective_timeout_s": 120}),
                        log_dir=tmp_path)
    wait_for_step(run / "metrics.jsonl", 3, procs)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        code = procs[0].wait(timeout=120)
    finally:
        procs[1].send_signal(signal.SIGKILL)
        stop(procs)
    log = (tmp_path / "rank0.log").read_text()
    assert code == EXIT_HANG, log
    assert "(rank 0): error: no progress for" in log and "in phase '" in log and "train.watchdog_s" in log


STALL_PROBE = """
import sys, time, torch, torch.distributed as dist
from ds_moekd.runtime.dist import init_distributed, set_collective_timeout
from ds_moekd.run.errors import run_command

def main(argv):
    set_collective_timeout(3)  # what train() does with train.collective_timeout_s
    info = init_distributed()
    if info.rank == 1:
        time.sleep(120)  # never joins the all-reduce: a stalled rank
    dist.all_reduce(torch.ones(1))

run_command(main, [], "probe")
"""


def test_the_collective_timeout_reaches_the_process_group_and_names_a_hang(tmp_path):
    # The watchdog (above) is the guard that fires wherever a rank is stuck; this checks the
    # backstop: train.collective_timeout_s reaches gloo, and a timed-out collective is a hang (exit 4).
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", STALL_PROBE], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env=run_env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                           "MASTER_PORT": str(port)}))
             for r in range(2)]
    try:
        _, err = procs[0].communicate(timeout=90)
    finally:
        stop(procs)
    assert procs[0].returncode == EXIT_HANG, err
    assert "probe (rank 0): error: a collective timed out (train.collective_timeout_s)" in err


# -- numerics ---------------------------------------------------------------------------------


def _nan_student(tiny_demo: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_demo / "student", out)
    weights = load_file(out / "model.safetensors")
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name][0] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


# (policy, max skipped steps, steps) -> what stops the run
NAN_CASES = {
    "skip": ("skip", 2, 8, "step 3: non-finite loss", "> train.max_skipped_steps=2"),
    "stop": ("stop", 2, 8, "step 1: non-finite loss", "train.nonfinite=stop"),
    # within the limit to the end: the final checkpoint's finite-weights check refuses
    "end": ("skip", 10, 2, "refusing to write checkpoint step2", "the student has non-finite weights"),
}


@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_a_nan_weight_stops_the_run_without_checkpoint_or_export(tiny_demo, good_run, tmp_path, case):
    policy, max_skipped, steps, *expected = NAN_CASES[case]
    out = _copy_run(good_run, tmp_path)  # a good finished run first
    good_export = _tree_digest(out / "rel" / "student_hf")
    bad = tiny_overrides(tiny_demo, out, steps=steps, **{
        "student.path": _nan_student(tiny_demo, tmp_path / "nan_student"), "train.overwrite": "true",
        "train.save_every": 1, "train.nonfinite": policy, "train.max_skipped_steps": max_skipped})
    codes, text = run_once(bad, tmp_path)
    assert codes == [EXIT_NUMERICS] * 2, text
    assert all(e in text for e in expected) and "Traceback" not in text, text
    assert _committed(out / "rel") == []  # no checkpoint of a skipped step or of NaN weights
    assert _tree_digest(out / "rel" / "student_hf") == good_export


def test_a_diverging_learning_rate_is_caught(tiny_demo, tmp_path):
    codes, text = run_once(tiny_overrides(tiny_demo, tmp_path / "out", steps=20, **{
        "optim.lr": 1e30, "optim.warmup_steps": 0, "train.nonfinite": "stop", "optim.grad_clip": 0.0}), tmp_path)
    assert codes == [EXIT_NUMERICS] * 2, text
    assert "non-finite" in text and not (tmp_path / "out" / "rel" / "student_hf").exists()


# -- checkpoints ------------------------------------------------------------------------------


def test_resume_skips_corrupt_and_uncommitted_checkpoints_and_refuses_changed_settings(tiny_demo, tmp_path):
    out = tmp_path / "out"
    run = out / "rel"
    codes, text = run_once(tiny_overrides(tiny_demo, out, steps=6, **{"train.save_every": 1,
                                                                      "train.keep_checkpoints": 3}), tmp_path)
    assert codes == [0, 0], text
    assert _committed(run) == [4, 5, 6]  # keep the last 3
    shard = sorted((run / "checkpoints" / "step6").glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    shard.write_bytes(bytes(data))
    (run / "checkpoints" / "step5" / "manifest.json").unlink()  # as if the save never finished
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a half-written last line
    resume = tiny_overrides(tiny_demo, out, steps=6, **{"train.resume": "true"})
    codes, text = run_once(resume + ["optim.lr=0.01"], tmp_path)
    assert codes == [EXIT_USAGE] * 2, text
    trained_lr = load_config(REPO / "ds_configs/methods/kd.yaml").optim.lr  # what the ranks were started with
    assert f"optim.lr: {trained_lr} in the checkpoint, 0.01 now" in text and "train.allow_config_change" in text
    codes, text = run_once(resume, tmp_path)
    assert codes == [0, 0], text
    assert "skipping" in text and "step6" in text and "does not match its checksum" in text
    assert "step5" in text and "not committed" in text
    assert "resumed from" in text and "step4" in text
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, 7))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_fails_clearly_and_keeps_the_last_committed_checkpoint(tiny_demo, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1700k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        codes, text = run_once(tiny_overrides(tiny_demo, disk, steps=20, **{"train.save_every": 1,
                                                                            "train.keep_checkpoints": 0}), tmp_path)
        committed = _committed(disk / "rel")
        latest = (disk / "rel" / "checkpoints" / "latest").read_text()
    finally:
        subprocess.run(["umount", "-l", str(disk)])
    assert codes == [EXIT_ENVIRONMENT] * 2, text
    assert "disk full while writing checkpoint" in text and "not committed" in text and "Traceback" not in text
    assert committed and latest == f"step{committed[-1]}"


# -- run folders ------------------------------------------------------------------------------


def test_a_finished_run_folder_is_refused_unless_resumed_or_overwritten(tiny_demo, good_run, tmp_path):
    out = _copy_run(good_run, tmp_path)
    before = (out / "rel" / "metrics.jsonl").read_text()
    codes, text = run_once(tiny_overrides(tiny_demo, out, steps=2), tmp_path)
    assert codes == [EXIT_USAGE] * 2 and "already holds a finished run" in text and "train.overwrite=true" in text
    assert (out / "rel" / "metrics.jsonl").read_text() == before
