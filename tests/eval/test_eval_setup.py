"""`ds-moekd eval` sets its process up like `ds-moekd train`: the dtype follows `--precision`
unless `--dtype` is given, and threads and LOCAL_SIZE come from ds_moekd/runtime/host.py."""

from __future__ import annotations

import json
import os

import torch

from ds_moekd.eval import cli as eval_cli


def _dtype(*flags: str) -> torch.dtype:
    return eval_cli.model_dtype(eval_cli.parse_args(["--model", "m", "--data", "d", "--out", "o", *flags]),
                                torch.device("cpu"))


def test_the_dtype_follows_precision_unless_given():
    assert _dtype() == torch.float32  # auto: fp32 on a CPU, as training
    assert _dtype("--precision", "bf16") == torch.bfloat16
    assert _dtype("--precision", "bf16", "--dtype", "float16") == torch.float16


def test_eval_runs_in_the_precision_with_the_thread_and_local_size_setup_of_train(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as a launcher with two ranks on this host sets it
    threads = torch.get_num_threads()
    try:
        eval_cli.main(["--model", str(tiny_demo / "student"), "--data", str(tiny_demo / "data/test.jsonl"), "--greedy",
                       "--max-new-tokens", "2", "--precision", "bf16", "--out", str(tmp_path / "r.json")])
        assert os.environ["LOCAL_SIZE"] == "2"
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "r.json").read_text())["model"]["dtype"] == "bfloat16"
