"""Backend choice for the expert FFN and the fused loss, and the entry points the project calls.

Backends: `torch` (plain torch; the CPU default and the reference), `triton` (our kernels; on CPU
only under TRITON_INTERPRET=1), `torch_grouped_mm` (`grouped_mm` where torch and the GPU support it),
`megablocks` (the `gpu` extra). "auto" picks by device and dtype. Which of the two expert paths runs
(grouped or dense) is the teacher's MoE block's choice (ds_moekd/teacher/dense_dispatch.py,
`takes_dense_path`), not this module's.
Each (operation, backend, device, dtype) is logged once; a forced backend that cannot run raises.
`configure` sets what "auto" means for the process (the run config's teacher.expert_backend and
kd.loss_backend); an explicit backend argument still wins.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from . import grouped
from .dense import dense_swiglu
from .divergence import fused_lm_head_loss, logits_divergence

logger = logging.getLogger("ds_moekd.kernels")

BACKENDS = ("torch", "triton", "torch_grouped_mm", "megablocks")
LOSS_BACKENDS = ("torch", "triton")
_logged: set[tuple] = set()
_configured = {"experts": "auto", "loss": "auto"}


def configure(*, expert_backend: str = "auto", loss_backend: str = "auto") -> None:
    """Force the backend that "auto" resolves to, for the expert FFN and for the divergences."""
    for name, value, allowed in (
        ("expert_backend", expert_backend, BACKENDS),
        ("loss_backend", loss_backend, LOSS_BACKENDS),
    ):
        if value != "auto" and value not in allowed:
            raise ValueError(
                f"ds_moekd.kernels.configure: {name}={value!r} is not 'auto' or one of {allowed}"
            )
    _configured.update(experts=expert_backend, loss=loss_backend)


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run on this device/dtype, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton, or the `dev`/`gpu` extra)"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (
                f"triton needs a CUDA device (got {device.type}; TRITON_INTERPRET=1 runs it on CPU, slowly)"
            )
        return None
    if backend == "torch_grouped_mm":
        if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
            return f"torch {torch.__version__} has no grouped_mm"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "grouped_mm needs a GPU of compute capability 8.0 or newer"
        return None
    if backend == "megablocks":
        if device.type != "cuda":
            return "megablocks needs a CUDA device"
        if importlib.util.find_spec("megablocks") is None or importlib.util.find_spec("grouped_gemm") is None:
            return "megablocks (with its grouped_gemm) is not installed: pip install 'ds-moekd[gpu]'"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"


def choose_backend(
    op: str, device: torch.device, dtype: torch.dtype, forced: str = "auto", family: str = "experts"
) -> str:
    if forced == "auto":
        forced = _configured[family]
    if forced != "auto":
        reason = unavailable_reason(forced, device, dtype)
        if reason:
            raise RuntimeError(f"ds_moekd.kernels: backend {forced!r} was asked for {op}, but {reason}")
        backend = forced
    elif device.type == "cuda" and dtype in (torch.bfloat16, torch.float16, torch.float32):
        backend = "triton" if unavailable_reason("triton", device, dtype) is None else "torch"
    else:
        backend = "torch"
    key = (op, backend, device.type, dtype)
    if key not in _logged:
        _logged.add(key)
        logger.info("ds_moekd.kernels: %s runs on backend %s (%s, %s)", op, backend, device.type, dtype)
    return backend


_GROUPED_MATMUL = {
    "torch": grouped.loop_matmul,
    "triton": grouped.triton_matmul,
    "torch_grouped_mm": grouped.grouped_mm_matmul,
    "megablocks": grouped.megablocks_matmul,
}


def grouped_experts(x_RH, tokens_per_expert_E, w_gate_up_EHJ, w_down_EIH, *, backend: str = "auto"):
    """Drop-in for `grouped_swiglu_reference`: rows already grouped by expert."""
    backend = choose_backend("grouped_swiglu", x_RH.device, x_RH.dtype, backend)
    return grouped.grouped_swiglu(
        x_RH,
        tokens_per_expert_E,
        w_gate_up_EHJ,
        w_down_EIH,
        _GROUPED_MATMUL[backend],
        fused_swiglu=backend == "triton" and not torch.is_grad_enabled(),
    )


def dense_experts(x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH, *, backend: str = "auto"):
    """Drop-in for `dense_swiglu_reference`; the GEMMs are torch's, `triton` fuses the elementwise steps."""
    backend = choose_backend("dense_swiglu", x_TH.device, x_TH.dtype, backend)
    return dense_swiglu(x_TH, gates_TE, w_gate_up_EHJ, w_down_EIH, use_triton=backend == "triton")


def _loss_backend(op: str, device, dtype, backend: str) -> str:
    if backend != "auto" and backend not in LOSS_BACKENDS:
        raise RuntimeError(f"ds_moekd.kernels: {op} runs on one of {LOSS_BACKENDS}, not {backend!r}")
    return choose_backend(op, device, dtype, backend, family="loss")


def divergence(student_NV, teacher_NV, *, kind, beta=0.5, temperature=1.0, chunk=0, backend="auto"):
    """Divergence summed over tokens, on logits already formed (`logits_divergence`)."""
    backend = _loss_backend("divergence", student_NV.device, student_NV.dtype, backend)
    return logits_divergence(
        student_NV,
        teacher_NV,
        kind=kind,
        beta=beta,
        temperature=temperature,
        chunk=chunk,
        use_triton=backend == "triton",
    )


def lm_head_divergence(
    hidden_NH, weight_VH, teacher, *, kind, beta=0.5, temperature=1.0, chunk=0, backend="auto"
):
    """The divergence term of `lm_head_loss` alone (no CE): a differentiable sum over tokens."""
    loss, _, _ = lm_head_loss(
        hidden_NH, weight_VH, teacher, kind=kind, beta=beta, temperature=temperature, chunk=chunk, backend=backend
    )
    return loss


def lm_head_loss(
    hidden_NH,
    weight_VH,
    teacher,
    targets_N=None,
    *,
    kind="forward_kl",
    beta=0.5,
    temperature=1.0,
    ce_weight=0.0,
    div_weight=1.0,
    chunk=0,
    backend="auto",
):
    """`fused_lm_head_loss` (CE + divergence in one pass over lm_head) with the row kernel chosen like
    `lm_head_divergence`; returns (weighted loss, CE sum, divergence sum)."""
    backend = _loss_backend("lm_head_loss", hidden_NH.device, hidden_NH.dtype, backend)
    return fused_lm_head_loss(
        hidden_NH,
        weight_VH,
        teacher,
        targets_N,
        kind=kind,
        beta=beta,
        temperature=temperature,
        ce_weight=ce_weight,
        div_weight=div_weight,
        chunk=chunk,
        use_triton=backend == "triton",
    )
