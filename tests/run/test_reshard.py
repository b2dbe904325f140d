"""Resume at another world size: a ZeRO-3 checkpoint written by 2 real ranks resumes on 1 and on 4
through DeepSpeed's universal checkpoint, with the same config: the global batch is kept by more
gradient accumulation on 1 rank and a smaller micro-batch on 4 (ds_moekd/run/elastic.py), and the
resumed steps equal an uninterrupted run (one process on the same global batches: the 2-rank and
1-rank runs agree, tests/launcher/test_multinode.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from ds_moekd.config import load_config
from ds_moekd.data.batching import TokenizedDataset, TokenizedExample
from ds_moekd.data.stream import rank_batches
from ds_moekd.run.elastic import batch_layout, keep_global_batch
from ds_moekd.run.errors import UserError
from ds_moekd.run.reshard import saved_world_size, universal_resume_config
from ds_moekd.runtime.telemetry import read_metrics
from ds_moekd.train import train

CONFIG = REPO / "ds_configs/methods/kd.yaml"
GLOBAL_BATCH, FIRST, TOTAL = 4, 3, 5
WRITER_MICRO_BATCH = GLOBAL_BATCH // 2  # the 2-rank run's; resumes keep this config


def _overrides(tiny_demo, out, name, micro_batch, steps, resume=False):
    return [
        f"name={name}", f"output_dir={out}", f"train.steps={steps}", f"data.micro_batch_size={micro_batch}",
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
    rank_pool2.run(_train_on_rank, _overrides(tiny_demo, out, "two", WRITER_MICRO_BATCH, FIRST), timeout_s=600)
    _one_process(_overrides(tiny_demo, out, "reference", GLOBAL_BATCH, TOTAL), out)
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


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_one(two_rank_run, tiny_demo, tmp_path):
    out = _copy(two_rank_run, tmp_path)
    assert saved_world_size(out / "resumed/checkpoints/step3") == 2
    log = _one_process(_overrides(tiny_demo, out, "resumed", WRITER_MICRO_BATCH, TOTAL, resume=True), out)
    assert "keeping its global batch of 4 on 1: data.micro_batch_size=2 train.gradient_accumulation_steps=2" in log
    assert "converting it to a universal checkpoint" in log
    assert (out / "resumed/checkpoints/latest_universal").read_text() == "step3_universal"
    _assert_continues_the_reference(two_rank_run, out / "resumed")
    assert saved_world_size(out / "resumed/checkpoints/step5") == 1  # later checkpoints are the new size's


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_four(two_rank_run, rank_pool4, tiny_demo, tmp_path):
    out = _copy(two_rank_run, tmp_path)
    rank_pool4.run(_train_on_rank, _overrides(tiny_demo, out, "resumed", WRITER_MICRO_BATCH, TOTAL, resume=True),
                   timeout_s=600)
    _assert_continues_the_reference(two_rank_run, out / "resumed")
    config = (out / "resumed/config.yaml").read_text()  # the micro-batch shrank to keep the global batch
    assert "micro_batch_size: 1" in config and "gradient_accumulation_steps: 1" in config
    assert saved_world_size(out / "resumed/checkpoints/step5") == 4


def test_same_world_size_loads_the_checkpoint_as_it_is(two_rank_run):
    assert universal_resume_config(two_rank_run / "two/checkpoints", 2) == {}
    assert universal_resume_config(two_rank_run / "nothing-here", 3) == {}


def test_batch_layout_keeps_the_micro_batch_when_it_can():
    assert batch_layout(32, 2, 8) == (8, 2)  # accumulation makes up for fewer ranks
    assert batch_layout(32, 8, 8) == (4, 1)  # the micro-batch shrinks only when the per-rank share is smaller
    assert batch_layout(24, 4, 4) == (3, 2)  # the largest micro-batch <= 4 dividing 6
    assert batch_layout(32, 3, 8) is None


@pytest.mark.slow
def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_with_overrides_that_work(two_rank_run, tiny_demo):
    cfg = load_config(CONFIG, _overrides(tiny_demo, two_rank_run, "two", WRITER_MICRO_BATCH, TOTAL, resume=True))
    with pytest.raises(UserError) as refusal:
        keep_global_batch(cfg, two_rank_run / "two/checkpoints", world_size=3)
    message = str(refusal.value)
    assert "global batch of 4 cannot be kept on 3 ranks" in message and "([1, 2, 4])" in message
    assert "train.allow_config_change=true" in message
    assert "`data.micro_batch_size=1 train.gradient_accumulation_steps=1` (global batch 3)" in message
    assert "`data.micro_batch_size=2 train.gradient_accumulation_steps=1` (global batch 6)" in message
    assert keep_global_batch(cfg, two_rank_run / "two/checkpoints", world_size=2) is cfg  # same size: as it is


def test_every_step_draws_the_same_examples_however_its_global_batch_is_split():
    examples = [TokenizedExample(prompt_ids=[1, 2], response_ids=[3 + i]) for i in range(22)]  # 22 % 4 == 2
    data = TokenizedDataset(examples=examples, dropped_long_prompts=0)

    def steps(micro, ranks, accumulation, count=12):  # 2 epochs of 5 steps, and 2 more
        streams = [rank_batches(data, micro_batch_size=micro, dp_rank=r, dp_size=ranks, seed=1, pad_token_id=0,
                                accumulation=accumulation) for r in range(ranks)]
        return [sorted(i for _ in range(accumulation) for s in streams for i in next(s).example_ids.tolist())
                for _ in range(count)]

    assert steps(4, 1, 1) == steps(2, 2, 1) == steps(2, 1, 2) == steps(1, 2, 2)
