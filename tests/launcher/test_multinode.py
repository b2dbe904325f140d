"""Multi-node launch paths, exercised on this one machine over loopback.

Two "nodes" are two invocations of launcher/multinode.sh on a two-host hostfile, each with
`-- --no_ssh --node_rank N` (what nodes that cannot ssh to each other run); the teacher's EP
group of 2 then spans both, and the losses must equal one process on the concatenated batch.
A one-host hostfile must run without ssh and pass launcher flags through. When every process of
node 1 is killed, node 0 must name the lost rank and the last checkpoint, and that checkpoint must
resume on node 0 alone with the same global batch. SLURM is checked by rendering what `srun` would
run (fake `scontrol`/`srun` on PATH: there is no SLURM here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from ds_moekd.run.errors import EXIT_HANG
from ds_moekd.runtime.telemetry import read_metrics

pytestmark = pytest.mark.slow  # real processes (tests/conftest.py: full tier)

STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    # DS_MOEKD_NO_INSTALL: the launchers use this environment as it is (launcher/setup.sh).
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": sys.prefix,
            "DS_MOEKD_NO_INSTALL": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(_free_port()), **extra}


def _overrides(tiny_demo, out, name, micro_batch, ep_size):
    return [
        f"name={name}", f"output_dir={out}", f"train.steps={STEPS}", f"data.micro_batch_size={micro_batch}",
        f"data.train_file={tiny_demo}/data/train.jsonl", f"data.valid_file={tiny_demo}/data/valid.jsonl",
        f"teacher.path={tiny_demo}/teacher", f"student.path={tiny_demo}/student", "report.eval_examples=0",
        "validation.every=0", f"student.deepspeed_config={REPO}/ds_configs/zero3_cpu.json",
        f"teacher.ep_size={ep_size}",
    ]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-4000:]}"


def test_two_nodes_on_loopback_match_one_process(tiny_demo, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes that never ssh to each other\nnode-a slots=1\nnode-b slots=1\n")
    config = REPO / "ds_configs/methods/kd.yaml"
    env = _env()
    nodes = [
        subprocess.Popen(["bash", str(REPO / "launcher/multinode.sh"), str(hostfile), str(config),
                          *_overrides(tiny_demo, tmp_path, "two", 3, 2), "--", "--no_ssh", "--node_rank", str(rank)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    for rank, node in enumerate(nodes):
        out, _ = node.communicate(timeout=600)
        _check(node, out, f"node {rank}")
    one = subprocess.run([sys.executable, "-m", "ds_moekd.train", "--config", str(config),
                          *_overrides(tiny_demo, tmp_path, "one", 6, 1)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    _check(one, one.stdout + one.stderr, "the one-process run")

    run = json.loads((tmp_path / "two/run.json").read_text())
    assert run["world_size"] == 2 and run["teacher_ep_size"] == 2
    experts = [set(r["teacher"]["local_expert_ids"]) for r in run["per_rank"]]  # one rank per node
    assert experts[0].isdisjoint(experts[1]) and experts[0] | experts[1] == set(range(run["teacher_num_experts"]))
    two, single = read_metrics(tmp_path / "two/metrics.jsonl"), read_metrics(tmp_path / "one/metrics.jsonl")
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(two, single, strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "ce", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_one_host_hostfile_runs_here_and_passes_launcher_flags(tiny_demo, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    logs = tmp_path / "rank_logs"
    proc = subprocess.run(["bash", str(REPO / "launcher/multinode.sh"), str(hostfile), str(REPO / "ds_configs/methods/kd.yaml"),
                           *_overrides(tiny_demo, tmp_path, "local", 3, 2), "train.steps=1",
                           "--", "--enable_each_rank_log", str(logs)],
                          cwd=tmp_path, env=_env(MASTER_ADDR=""), capture_output=True, text=True, timeout=600)
    _check(proc, proc.stdout + proc.stderr, "multinode.sh on a one-host hostfile")
    assert "not reachable via ssh" not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "local/run.json").read_text())["world_size"] == 2
    assert len(list(logs.glob("*.log"))) == 2  # the launcher flag after `--` reached deepspeed


def _committed(run: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in (run / "checkpoints").glob("step*") if (p / "manifest.json").is_file())


@pytest.mark.slow
def test_a_lost_node_is_named_and_its_checkpoint_resumes_on_the_remaining_node(tiny_demo, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    config = str(REPO / "ds_configs/methods/kd.yaml")
    run, env = tmp_path / "two", _env()
    job = [*_overrides(tiny_demo, tmp_path, "two", 3, 2), "train.steps=100000", "train.save_every=2"]
    nodes = [subprocess.Popen(["bash", str(REPO / "launcher/multinode.sh"), str(hostfile), config, *job,
                               "--", "--no_ssh", "--node_rank", str(rank)], cwd=tmp_path, env=env,
                              stdout=open(tmp_path / f"node{rank}.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
             for rank in (0, 1)]
    try:
        while len(_committed(run)) < 2 and all(node.poll() is None for node in nodes):
            time.sleep(0.2)
        os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1 is gone: its launcher and its rank
        code = nodes[0].wait(timeout=120)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    text = (tmp_path / "node0.log").read_text()
    last = _committed(run)[-1]
    assert code == EXIT_HANG, text
    assert "(rank 0): error: a collective failed" in text and "lost rank 1 (host " in text, text
    assert f"the last committed checkpoint is {run}/checkpoints/step{last}: resume with train.resume=true" in text

    # node 0 alone: one rank (the teacher whole on it), the same config otherwise
    alone = tmp_path / "alone"
    alone.write_text("localhost slots=1\n")
    resume = [*_overrides(tiny_demo, tmp_path, "two", 3, 1), f"train.steps={last + 2}", "train.resume=true"]
    proc = subprocess.run(["bash", str(REPO / "launcher/multinode.sh"), str(alone), config, *resume], cwd=tmp_path,
                          env=_env(MASTER_ADDR=""), capture_output=True, text=True, timeout=600)
    _check(proc, proc.stdout + proc.stderr, "the resume on node 0 alone")
    assert "keeping its global batch of 6 on 1: data.micro_batch_size=3 train.gradient_accumulation_steps=2" in \
        proc.stdout + proc.stderr
    reference = subprocess.run([sys.executable, "-m", "ds_moekd.train", "--config", config,
                                *_overrides(tiny_demo, tmp_path, "one", 6, 1), f"train.steps={last + 2}"],
                               cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    _check(reference, reference.stdout + reference.stderr, "the one-process reference")
    resumed, single = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "one/metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, last + 3))  # the loss curve goes on where it stopped
    for a, b in zip(resumed, single, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


def _fake(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_renders_srun_with_master_addr_from_the_node_list(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # scontrol expands the node list; srun prints what it would run, with the rendezvous variables
    _fake(fake_bin / "scontrol", '[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || exit 3\nprintf "gpu-07\\ngpu-08\\n"\n')
    _fake(fake_bin / "srun", 'echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"\necho "ARGS $*"\n')
    env = _env(PATH=f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[07-08]",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="41234")
    for key in ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"):  # the job script must set them itself
        env.pop(key)
    out = subprocess.run(["bash", str(REPO / "launcher/slurm.sbatch"), "ds_configs/methods/kd.yaml", "train.steps=5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    _check(out, out.stdout + out.stderr, "slurm.sbatch")
    lines = out.stdout.splitlines()
    assert "MASTER_ADDR=gpu-07 MASTER_PORT=21234" in lines  # the port follows the job id: jobs on a node differ
    args = next(line for line in lines if line.startswith("ARGS ")).split()[1:]
    assert args[0] == "--kill-on-bad-exit=1" and Path(args[1]).name == "python"
    assert args[2:] == ["-m", "ds_moekd.train", "--config", "ds_configs/methods/kd.yaml", "train.steps=5"]
