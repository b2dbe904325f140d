"""A simulated accelerator, so a CPU test can catch a tensor left off the run's device.

On a CPU-only machine every tensor is on `cpu`, so a forgotten `.to(device)` or a factory call
without `device=` goes unnoticed until the job meets a GPU. Under `simulated_device()` the run is
given the device `lazy` instead (the one non-CPU device type a CPU build of PyTorch can put a
tensor on and differentiate through). Tensors on it are `SimTensor`s: wrappers that compute on a
CPU tensor inside. Every operation that meets both a `SimTensor` and a CPU tensor of one or more
dimensions raises `DeviceMismatch`, as CUDA does; 0-dim CPU tensors (scalars) are allowed there,
as on CUDA. So do collectives handed a tensor that is not on the device (NCCL's rule).
Moves with `.to()`/`.cpu()` and `torch.tensor(..., device=...)` work as on a GPU.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("lazy")
_COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "all_gather", "reduce")


def _device_module() -> types.ModuleType:
    """What torch looks up as `torch.<device type>` (activation checkpointing saves its RNG state)."""
    module = types.ModuleType(f"torch.{DEVICE.type}")
    module.device = lambda index: contextlib.nullcontext()
    module.get_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    module.set_rng_state = lambda *args, **kwargs: None
    module.device_count = lambda: 1
    module.current_device = lambda: 0
    module.is_available = lambda: True
    return module


if not hasattr(torch, DEVICE.type):
    torch._register_device_module(DEVICE.type, _device_module())


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a tensor on the simulated device."""


class SimTensor(torch.Tensor):
    """A tensor on the simulated device; `inner` holds its values on the CPU."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=DEVICE,
        )
        wrapper.inner = inner
        return wrapper

    def __repr__(self) -> str:
        return f"SimTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _unwrap(x):
    return x.inner if isinstance(x, SimTensor) else x


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    sims = [t for t in flat if isinstance(t, SimTensor)]
    host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, SimTensor) and t.dim() > 0]
    if sims and host and func not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
        shapes = [tuple(t.shape) for t in host]
        raise DeviceMismatch(f"{func} got tensors on {DEVICE.type} and CPU tensors of shapes {shapes}")
    kwargs = dict(kwargs)
    to_device = _on_device(kwargs.get("device"))
    to_host = kwargs.get("device") is not None and not to_device
    if to_device:
        kwargs["device"] = torch.device("cpu")
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is torch.ops.aten.copy_.default:  # copy_(dst, src) lives where dst does
        return args[0]
    wrapped_inputs = {id(s.inner): s for s in sims}  # in-place ops return their input: hand back its wrapper
    wrap = to_device or (bool(sims) and not to_host)

    def rewrap(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor):
            if id(x) in wrapped_inputs:
                return wrapped_inputs[id(x)]
            return SimTensor(x) if wrap else x
        return x

    return tree_map(rewrap, out)


def _factory_kernels() -> torch.library.Library:
    """Kernels of the device's dispatch key for what allocates on it: every factory (`zeros`,
    `arange`, `torch.tensor(..., device=)`, `.to(device)`) comes down to these. Kernels, not a
    dispatch mode, since autograd runs the backward (and recomputed forwards) on a thread of its own."""
    kernels = torch.library.Library("aten", "IMPL")
    key = "Lazy"

    def empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
        return SimTensor(torch.empty(size, dtype=dtype, layout=layout, memory_format=memory_format))

    def empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
        return SimTensor(torch.empty_strided(size, stride, dtype=dtype, layout=layout))

    def copy_from(src, dst, non_blocking=False):
        dst.inner.copy_(_unwrap(src))
        return dst

    kernels.impl("empty.memory_format", empty, key)
    kernels.impl("empty_strided", empty_strided, key)
    kernels.impl("_copy_from", copy_from, key)
    return kernels


_KERNELS = _factory_kernels()


class _FunctionMode(torch.overrides.TorchFunctionMode):
    """`Tensor.tolist` refuses tensor subclasses before any dispatch: read the values here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist and isinstance(args[0], SimTensor):  # a device-to-host read, as on CUDA
            return args[0].inner.tolist()
        return func(*args, **(kwargs or {}))


def _checked_collective(name: str, collective):
    def run(*args, **kwargs):
        flat, _ = tree_flatten((args, kwargs))
        host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, SimTensor)]
        if host:
            raise DeviceMismatch(f"torch.distributed.{name} got CPU tensors of shapes {[tuple(t.shape) for t in host]}"
                                 f" (NCCL reduces tensors on the rank's GPU only)")
        return collective(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

    return run


@contextlib.contextmanager
def simulated_device():
    """Within: `DEVICE` behaves like a GPU beside the CPU; yields DEVICE."""
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}
    try:
        for name, collective in originals.items():
            setattr(dist, name, _checked_collective(name, collective))
        with _FunctionMode():
            yield DEVICE
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
