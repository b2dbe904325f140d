"""torch's own `F.linear` where ZeRO-3's replacement is only overhead.

Building a ZeRO-3 model (`deepspeed.zero.Init`, which transformers enters to load the student)
swaps `torch.nn.functional.linear` process-wide for DeepSpeed's autograd function, whose backward
can re-gather a weight that was partitioned after the forward. A forward without autograd
(teacher forwards, decoding) never runs that backward, yet pays a Python autograd function per
linear call, and the teacher is not a ZeRO-3 model at all. Those forwards run with torch's own
(docs/scale-out.md, "The changes behind these figures").
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def torch_linear():
    """Inside: torch's `F.linear` when autograd is off and ZeRO-3 has replaced it; else unchanged.
    (With autograd on it stays: a checkpointed layer must recompute with the same function.)"""
    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init
    except ImportError:  # DeepSpeed absent: nothing replaced F.linear
        yield
        return
    original, current = getattr(Init, "linear_bk", None), F.linear
    if original is None or current is original or torch.is_grad_enabled():
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = current
