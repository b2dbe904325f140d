"""Every tensor of the training path lives on the device the run was given (docs/devices.md).

The run is given a simulated accelerator (tests/helpers/sim_device.py): any op that meets a CPU tensor
beside a device tensor raises, and so does a collective handed a CPU tensor (NCCL's rule). Two
real ranks (teacher EP 2) run the shipped method configs through the training code: the data
stream, the teacher read from its checkpoint, the teacher's routings and draws, rollouts, SAR's
router step, the loss and its backward, the per-step record and validation. The student is a
plain torch model with AdamW in place of the DeepSpeed engine (DeepSpeed does not run on a
simulated device); ZeRO-3's own placement is DeepSpeed's. The same steps on the CPU give the
same losses, so the simulation changes nothing but the checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import REPO
from helpers.sim_device import DEVICE, DeviceMismatch, SimTensor, simulated_device
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.config import load_config
from ds_moekd.eval.validation import Validator
from ds_moekd.methods import build_method
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.telemetry import Stopwatch
from ds_moekd.train import fused_head, load_teacher, step_record, train_step, training_data

STEPS = 2


class PlainEngine:
    """The slice of DeepSpeed's engine API the training step uses, on a plain torch module."""

    def __init__(self, module, lr: float, device):
        self.module, self.device = module, torch.device(device)
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
        self.lr = lr

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self):
        return [self.lr]


def _config(method: str, run_dir: Path, demo: str):
    """The shipped method config on the tiny demo build (the same code path, smaller models)."""
    return load_config(REPO / "ds_configs" / "methods" / f"{method}.yaml", [
        f"output_dir={run_dir}", f"data.train_file={demo}/data/train.jsonl", f"data.valid_file={demo}/data/valid.jsonl",
        f"teacher.path={demo}/teacher", f"student.path={demo}/student", "data.micro_batch_size=2", "gkd.max_new_tokens=4", "validation.every=1",
        "validation.examples=4", "validation.batch_size=2", "validation.max_new_tokens=3",
        "validation.keep_best=false",
    ])


def _steps(method: str, run_dir: str, demo: str, device) -> list[float]:
    """STEPS training steps and one validation with everything on `device`; the global losses."""
    cfg = _config(method, Path(run_dir) / str(device), demo)
    groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.student.path))
    vocab = len(tokenizer)
    _, batches, _ = training_data(cfg, tokenizer, groups, device)
    method_impl = build_method(cfg, tokenizer)
    teacher = load_teacher(cfg, groups, device, "fp32") if method_impl.needs_teacher else None
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.student.path), dtype=torch.float32).to(device)
    student.config.use_cache = False
    attach = fused_head(cfg, method_impl, vocab)
    if attach is not None:
        attach(student)
    engine = PlainEngine(student, cfg.optim.lr, device)
    losses = []
    for step in range(STEPS):
        watch = Stopwatch()
        shares = train_step(engine, teacher, method_impl, [next(batches)], groups, vocab, watch, 0, step)
        losses.append(step_record(step + 1, engine, groups, shares, watch, 1.0)["loss"])
    (Path(cfg.run_dir)).mkdir(parents=True, exist_ok=True)
    Validator.create(cfg, tokenizer, groups).run(engine, STEPS)
    moved = [p for p in student.parameters() if not isinstance(p, SimTensor)] if device == DEVICE else []
    assert not moved, f"{len(moved)} student parameters left the device"
    return losses


def guarded_steps(method: str, run_dir: str, demo: str) -> dict:
    with simulated_device() as device:
        on_device = _steps(method, run_dir, demo, device)
    return {"device": on_device, "cpu": _steps(method, run_dir, demo, torch.device("cpu"))}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "gkd", "ka", "sar"])
def test_training_path_stays_on_the_run_device(rank_pool2, tiny_demo, tmp_path, method):
    results = rank_pool2.run(guarded_steps, method, str(tmp_path), str(tiny_demo), timeout_s=600)
    for result in results:
        assert all(math.isfinite(x) for x in result["device"])
        assert result["device"] == pytest.approx(result["cpu"], rel=1e-5, abs=1e-6)


def forgotten_move(run_dir: str, demo: str) -> str:
    """The data stream left on the CPU while the teacher is on the device: the guard must object."""
    cfg = _config("kd", Path(run_dir), demo)
    groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.student.path))
    with simulated_device() as device:
        _, batches, _ = training_data(cfg, tokenizer, groups, torch.device("cpu"))  # the bug: not `device`
        teacher = load_teacher(cfg, groups, device, "fp32")
        batch = next(batches)
        try:
            teacher(batch.input_ids, attention_mask=batch.attention_mask)
        except DeviceMismatch as exc:
            return str(exc)
    return "not caught"


@pytest.mark.slow
def test_the_guard_catches_a_missing_move(rank_pool2, tiny_demo, tmp_path):
    for message in rank_pool2.run(forgotten_move, str(tmp_path), str(tiny_demo), timeout_s=300):
        assert "CPU tensors" in message


def test_the_simulated_device_checks_factories_moves_and_collectives():
    with simulated_device() as device:
        x = torch.arange(6.0, device=device).view(2, 3)
        assert isinstance(x, SimTensor) and x.device.type == device.type
        with pytest.raises(DeviceMismatch):
            x + torch.ones(2, 3)  # a factory call without device=
        assert torch.equal((x + torch.ones(2, 3).to(device)).cpu(), torch.arange(6.0).view(2, 3) + 1)
        assert (x * torch.tensor(2.0)).sum().item() == 30.0  # CPU scalars mix, as on CUDA
        y = torch.zeros(3, device=device)
        y.add_(torch.tensor([1.0, 2.0, 3.0], device=device))
        assert y.cpu().tolist() == [1.0, 2.0, 3.0]
        with pytest.raises(DeviceMismatch):
            torch.distributed.all_reduce(torch.ones(2))
