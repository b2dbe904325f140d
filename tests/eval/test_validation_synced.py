"""`validation.generation: synced` inside a real 2-rank ZeRO-3 training run: training steps between
validations (the case that used to crash at the second validation, when decoding on the live
partitioned module under inference mode left inference tensors that the next backward saved)."""

from __future__ import annotations

import json

from helpers import REPO

from ds_moekd.config import load_config
from ds_moekd.train import train


def _train(config_path, overrides):
    record = train(load_config(config_path, overrides))
    return record is not None


def test_synced_validation_survives_training_between_validations(rank_pool2, tiny_demo, tmp_path):
    overrides = [
        "name=synced", "method=sft", f"output_dir={tmp_path}", "train.steps=4", "data.micro_batch_size=2",
        f"data.train_file={tiny_demo}/data/train.jsonl", f"data.valid_file={tiny_demo}/data/valid.jsonl",
        f"student.path={tiny_demo}/student", f"student.deepspeed_config={REPO}/ds_configs/zero3_cpu.json",
        "report.eval_examples=0", "validation.every=1", "validation.examples=2", "validation.max_new_tokens=3",
        "validation.generation=synced",
    ]
    assert rank_pool2.run(_train, REPO / "ds_configs/methods/kd.yaml", overrides, timeout_s=300) == [True, False]
    logged = [json.loads(line) for line in (tmp_path / "synced" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # four validations, each followed by training
    assert (tmp_path / "synced" / "best_student_hf" / "best.json").is_file()
