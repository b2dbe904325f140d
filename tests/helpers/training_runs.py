"""Whole training jobs on a rank pool: the run function each rank calls, and the overrides of the tiny
two-rank kd run the end-to-end tests share."""

from __future__ import annotations

from ds_moekd.config import load_config
from ds_moekd.train import train
from helpers import REPO

STEPS = 6  # the end-to-end kd run's length


def train_on_rank(config_path, overrides):
    record = train(load_config(config_path, overrides))
    return record is not None


def e2e_overrides(tiny_demo, out):
    return [
        "name=e2e", f"output_dir={out}", f"train.steps={STEPS}", "train.save_every=3", "data.micro_batch_size=3",
        f"data.train_file={tiny_demo}/data/train.jsonl", f"data.valid_file={tiny_demo}/data/valid.jsonl",
        f"teacher.path={tiny_demo}/teacher", f"student.path={tiny_demo}/student", "report.eval_examples=4",
        "report.max_new_tokens=4", "validation.every=3", "validation.examples=4", "validation.max_new_tokens=4",
        f"student.deepspeed_config={REPO}/ds_configs/zero3_cpu.json",
    ]
