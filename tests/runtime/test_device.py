"""Device, backend and precision choices (ds_moekd/runtime/device.py) and how the DeepSpeed JSON follows them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO

from ds_moekd.config import load_config
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.runtime.device import collective_backend, resolve_precision, teacher_dtype
from ds_moekd.student.engine import deepspeed_config_path, load_deepspeed_config

CPU, GPU = torch.device("cpu"), torch.device("cuda", 3)


def test_backend_follows_the_device_unless_forced():
    assert collective_backend("auto", CPU) == "gloo"
    assert collective_backend("auto", GPU) == "nccl"
    assert collective_backend("gloo", GPU) == "gloo"
    with pytest.raises(ValueError, match="nccl needs GPUs"):
        collective_backend("nccl", CPU)
    with pytest.raises(ValueError, match="dist_backend"):
        collective_backend("mpi", CPU)


def test_precision_auto_is_fp32_on_cpu_and_the_teacher_follows_it():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert teacher_dtype("auto", "bf16") is torch.bfloat16
    assert teacher_dtype("float32", "bf16") is torch.float32  # an explicit teacher dtype wins
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", CPU)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_deepspeed_json_takes_the_runs_precision(precision):
    cfg = load_config(REPO / "ds_configs/methods/kd.yaml", [f"precision={precision}"])
    for device in (CPU, GPU):
        path = deepspeed_config_path(cfg.student.deepspeed_config, device)
        ds = load_deepspeed_config(path, cfg, world_size=2, precision=precision)
        assert ds["bf16"]["enabled"] == (precision == "bf16")
        assert ds["fp16"]["enabled"] == (precision == "fp16")
    assert deepspeed_config_path("auto", GPU).name == "zero3_gpu.json"
    assert deepspeed_config_path("auto", CPU).name == "zero3_cpu.json"


def test_a_json_that_disagrees_with_the_precision_is_refused(tmp_path):
    ds = json.loads((REPO / "ds_configs/zero3_cpu.json").read_text())
    ds["bf16"] = {"enabled": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(REPO / "ds_configs/methods/kd.yaml", ["precision=fp32"])
    with pytest.raises(ValueError, match=r"bf16.enabled=True conflicts with precision='fp32'"):
        load_deepspeed_config(path, cfg, world_size=1, precision="fp32")
    assert load_deepspeed_config(path, cfg, world_size=1, precision="bf16")["bf16"]["enabled"] is True


def test_bad_precision_or_backend_in_a_config_names_the_field():
    with pytest.raises(ValueError, match="precision"):
        load_config(REPO / "ds_configs/methods/kd.yaml", ["precision=half"])
    with pytest.raises(ValueError, match="train.dist_backend"):
        load_config(REPO / "ds_configs/methods/kd.yaml", ["train.dist_backend=mpi"])


@pytest.mark.gpu
def test_the_teacher_is_read_straight_onto_the_gpu():
    from ds_moekd.teacher import MoETeacher

    torch.cuda.reset_peak_memory_stats()
    teacher = MoETeacher.from_pretrained(str(resolve_path("demo:teacher")), dtype=torch.bfloat16, device="cuda:0")
    assert {t.device for t in [*teacher.parameters(), *teacher.buffers()]} == {torch.device("cuda", 0)}
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9), device="cuda:0")
    assert teacher(ids).logits.device == ids.device
