"""DeepSpeed's own monitors from the run config: off by default; with `monitor.csv` and
`monitor.tensorboard` on, a 2-rank run's DeepSpeed CSV and TensorBoard writers hold every
metrics.jsonl value (written by rank 0 through engine.monitor.write_events) and DeepSpeed's own
learning-rate events."""

from __future__ import annotations

import csv

import pytest
from helpers import REPO

from ds_moekd.config import ConfigError, load_config
from ds_moekd.runtime.monitoring import monitor_sections
from ds_moekd.runtime.telemetry import read_metrics
from ds_moekd.train import train

CONFIG = REPO / "ds_configs/methods/kd.yaml"
STEPS = 3


def test_monitors_are_off_by_default_and_map_onto_deepspeed_sections(tmp_path):
    assert monitor_sections(load_config(CONFIG)) == {}
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "monitor.csv=true", "monitor.tensorboard=true",
                               "monitor.wandb=true", "monitor.wandb_team=lab"])
    sections = monitor_sections(cfg)
    assert sections["csv_monitor"] == {"enabled": True, "output_path": str(tmp_path / "kd/monitor"),
                                       "job_name": "csv"}
    assert sections["tensorboard"]["enabled"] and sections["tensorboard"]["job_name"] == "tensorboard"
    assert sections["wandb"] == {"enabled": True, "project": "ds-moekd", "team": "lab"}
    with pytest.raises(ConfigError, match="monitor.csvv"):
        load_config(CONFIG, ["monitor.csvv=true"])


def _train_on_rank(overrides):
    train(load_config(CONFIG, overrides))


@pytest.fixture(scope="module")
def monitored_run(rank_pool2, tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("monitored")
    rank_pool2.run(_train_on_rank, [
        "name=mon", f"output_dir={out}", f"train.steps={STEPS}", "data.micro_batch_size=2",
        f"data.train_file={tiny_demo}/data/train.jsonl", f"data.valid_file={tiny_demo}/data/valid.jsonl",
        f"teacher.path={tiny_demo}/teacher", f"student.path={tiny_demo}/student", "report.eval_examples=0",
        "validation.every=0", f"student.deepspeed_config={REPO}/ds_configs/zero3_cpu.json",
        "monitor.csv=true", "monitor.tensorboard=true",
    ], timeout_s=600)
    return out / "mon"


def test_csv_monitor_holds_the_metrics(monitored_run):
    metrics = read_metrics(monitored_run / "metrics.jsonl")
    folder = monitored_run / "monitor/csv"
    for key in ("loss", "ce", "kl", "tokens_per_s", "peak_memory_mb"):
        rows = list(csv.reader((folder / f"Train_ds_moekd_{key}.csv").open()))
        assert rows[0] == ["step", key]
        assert [int(r[0]) for r in rows[1:]] == [m["step"] for m in metrics]
        assert [float(r[1]) for r in rows[1:]] == pytest.approx([m[key] for m in metrics], rel=1e-12)
    assert len(list(csv.reader((folder / "Train_Samples_lr.csv").open()))) == STEPS + 1  # DeepSpeed's own


def test_tensorboard_monitor_holds_the_metrics(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(monitored_run / "monitor/tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "Train/Samples/lr" in tags
    metrics = read_metrics(monitored_run / "metrics.jsonl")
    loss = events.Scalars("Train/ds_moekd/loss")
    assert [e.step for e in loss] == [m["step"] for m in metrics]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # stored as float32
