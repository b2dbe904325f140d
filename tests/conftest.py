"""Shared fixtures: persistent CPU rank pools (spawned once per session) and the `gpu` marker."""

from __future__ import annotations

import os

import pytest
import torch
from multirank import RankPool

# Everything in the test suite runs on DeepSpeed's CPU accelerator over loopback.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Triton reads this when a kernel is decorated, i.e. when its module is first imported, which
# any test may trigger first: set it for the whole session (CPU runs kernels in the interpreter).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def rank_pool2():
    """Two gloo ranks, started on first use and shared by every test of the session."""
    with RankPool(2) as pool:
        yield pool


@pytest.fixture(scope="session")
def rank_pool4():
    """Four gloo ranks (started only if a test asks for them)."""
    with RankPool(4) as pool:
        yield pool


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny build of the demo workload (seconds): data, tokenizer, MoE teacher, student."""
    from ds_moekd.demo.build import build_demo

    out = tmp_path_factory.mktemp("tiny_demo")
    build_demo(out, seed=0, size="tiny", threads=1, log=lambda _: None)
    return out
