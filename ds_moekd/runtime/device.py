"""Where a rank computes, how ranks talk and which precision a run trains in (docs/devices.md).

One accelerator per rank: rank-local index `LOCAL_RANK` picks it. Everything a rank computes
with lives on `rank_device()`: the student (DeepSpeed puts it there), the teacher (read
straight onto it), batches, rollouts, random keys and evaluation. The CPU is a device like any
other: on a machine without GPUs every rank computes on `cpu` and talks gloo.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "nccl", "gloo")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def accelerator_type() -> str:
    """DeepSpeed's accelerator ("cuda", "cpu", ...): the device type its engine trains on."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def rank_device(local_rank: int = 0) -> torch.device:
    """The device this rank computes on: its own GPU (`cuda:LOCAL_RANK`), else the CPU."""
    kind = accelerator_type()
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, local_rank)


def bind_device(local_rank: int) -> torch.device:
    """Make the rank's GPU the current one before anything allocates on it or NCCL starts: without
    this every rank's first CUDA call lands on GPU 0 (a context per rank there, and NCCL hangs or
    fails when two ranks share a GPU)."""
    device = rank_device(local_rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "launch at most one rank per GPU (--num_gpus / --nproc_per_node)"
            )
        torch.cuda.set_device(device)
    return device


def collective_backend(requested: str, device: torch.device) -> str:
    """`train.dist_backend`: auto is NCCL between GPUs and gloo between CPU processes."""
    if requested not in BACKENDS:
        raise ValueError(f"train.dist_backend={requested!r}: expected one of {BACKENDS}")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError(f"train.dist_backend=nccl needs GPUs; this rank computes on {device} (use gloo or auto)")
    return requested


def resolve_precision(requested: str, device: torch.device) -> str:
    """`precision`: auto is bf16 on GPUs that have it (Ampere and newer), else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r}: expected one of {PRECISIONS}")
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def teacher_dtype(requested: str, precision: str) -> torch.dtype:
    """`teacher.dtype`: auto follows the run's precision; a dtype name overrides it."""
    if requested == "auto":
        return PRECISION_DTYPES[precision]
    return DTYPE_NAMES[requested]


def default_deepspeed_config(device: torch.device) -> str:
    """`student.deepspeed_config: auto`: a ZeRO-3 JSON sized for the device kind."""
    return "ds_configs/zero3_gpu.json" if device.type == "cuda" else "ds_configs/zero3_cpu.json"
