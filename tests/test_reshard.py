"""Resume at another world size: a ZeRO-3 checkpoint written by 2 real ranks resumes on 1 and on 4
through DeepSpeed's universal checkpoint, and the resumed steps equal an uninterrupted run (one
process on the same global batches: the 2-rank and 1-rank runs agree, tests/test_multinode.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ds_moekd.config import load_config
from ds_moekd.reshard import saved_world_size, universal_resume_config
from ds_moekd.telemetry import read_metrics
from ds_moekd.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ds_configs/methods/kd.yaml"
GLOBAL_BATCH, FIRST, TOTAL = 4, 3, 5


def _overrides(tiny_demo, out, name, world, steps, resume=False):
    return [
        f"name={name}", f"output_dir={out}", f"train.steps={steps}", f"data.micro_batch_size={GLOBAL_BATCH // world}",
        f"data.train_file={tiny_demo}/data/train.jsonl", f"data.valid_file={tiny_demo}/data/valid.jsonl",
        f"teacher.path={tiny_demo}/teacher", f"student.path={tiny_demo}/student", "report.eval_examples=0",
        "validation.every=0", f"student.deepspeed_config={REPO}/ds_configs/zero3_cpu.json", "teacher.ep_size=0",
        f"train.resume={str(resume).lower()}",
    ]


def _train_on_rank(overrides):
    train(load_config(CONFIG, overrides))


def _one_process(overrides, cwd):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ds_moekd.train", "--config", str(CONFIG), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_rank_run(rank_pool2, tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    rank_pool2.run(_train_on_rank, _overrides(tiny_demo, out, "two", 2, FIRST), timeout_s=600)
    _one_process(_overrides(tiny_demo, out, "reference", 1, TOTAL), out)
    return out


def _copy(two_rank_run, tmp_path) -> Path:
    shutil.copytree(two_rank_run / "two", tmp_path / "resumed")
    return tmp_path


def _assert_continues_the_reference(two_rank_run, run_dir):
    resumed, reference = read_metrics(run_dir / "metrics.jsonl"), read_metrics(two_rank_run / "reference/metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, TOTAL + 1))
    for a, b in zip(resumed, reference, strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "ce", "kl", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_checkpoint_of_two_ranks_resumes_on_one(two_rank_run, tiny_demo, tmp_path):
    out = _copy(two_rank_run, tmp_path)
    assert saved_world_size(out / "resumed/checkpoints/step3") == 2
    log = _one_process(_overrides(tiny_demo, out, "resumed", 1, TOTAL, resume=True), out)
    assert "converting it to a universal checkpoint" in log
    assert (out / "resumed/checkpoints/latest_universal").read_text() == "step3_universal"
    _assert_continues_the_reference(two_rank_run, out / "resumed")
    assert saved_world_size(out / "resumed/checkpoints/step5") == 1  # later checkpoints are the new size's


def test_checkpoint_of_two_ranks_resumes_on_four(two_rank_run, rank_pool4, tiny_demo, tmp_path):
    out = _copy(two_rank_run, tmp_path)
    rank_pool4.run(_train_on_rank, _overrides(tiny_demo, out, "resumed", 4, TOTAL, resume=True), timeout_s=600)
    _assert_continues_the_reference(two_rank_run, out / "resumed")
    assert saved_world_size(out / "resumed/checkpoints/step5") == 4


def test_same_world_size_loads_the_checkpoint_as_it_is(two_rank_run):
    assert universal_resume_config(two_rank_run / "two/checkpoints", 2) == {}
    assert universal_resume_config(two_rank_run / "nothing-here", 3) == {}
