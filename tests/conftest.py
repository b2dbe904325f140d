"""Shared fixtures: persistent CPU rank pools (spawned once per session), the `gpu` marker and
the two tiers.

Tiers: `slow` marks every test that starts processes (rank pools, launchers, subprocesses) or runs
a whole training; `bash tests/run.sh --quick` runs the rest (`-m "not slow"`, one process). A test
that asks for a rank pool is marked here; in the quick tier any other attempt to start a process
fails the test with a message saying to mark it, so the quick tier stays one process for real.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest
import torch
from helpers.multirank import RankPool

_POOL_FIXTURES = {"rank_pool2", "rank_pool4"}
_LOOKUPS = {"git", "uname", "numactl", "lscpu", "nvidia-smi", "ldconfig"}

# Everything in the test suite runs on DeepSpeed's CPU accelerator over loopback.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Triton reads this when a kernel is decorated, i.e. when its module is first imported, which
# any test may trigger first: set it for the whole session (CPU runs kernels in the interpreter).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _POOL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_real_popen_init = subprocess.Popen.__init__


def _refuse_process(self, args=None, *rest, **kwargs):
    # system lookups (platform's `uname -p`, the benches' git commit, DeepSpeed's numactl) are not test processes
    command = args if isinstance(args, (list, tuple)) else str(args).split()
    if command and os.path.basename(str(command[0])) in _LOOKUPS:
        return _real_popen_init(self, args, *rest, **kwargs)
    raise RuntimeError("this test starts a process: mark it @pytest.mark.slow (full tier; tests/conftest.py)")


@pytest.fixture(autouse=True)
def _quick_tier_starts_no_process(request, monkeypatch):
    if os.environ.get("DS_MOEKD_TEST_TIER") != "quick" or "slow" in request.keywords:
        return
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse_process)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        lambda self: _refuse_process(self, "multiprocessing.Process.start"))


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


@pytest.fixture
def one_process_group():
    """A 1-rank gloo group inside this process (an in-memory store: no process, no port), for the
    quick tier's one-process version of a multi-rank step. Torch's `F.linear` is restored after, as
    building a ZeRO-3 engine replaces it process-wide (ds_moekd/student/zero3.py), and so is the
    environment."""
    import torch.distributed as dist
    import torch.nn.functional as F

    linear, environ = F.linear, dict(os.environ)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    F.linear = linear
    # init_distributed exports RANK/WORLD_SIZE/...: later tests' launched ranks must not inherit them
    os.environ.clear()
    os.environ.update(environ)
    import deepspeed.utils.groups

    deepspeed.utils.groups._WORLD_GROUP = None  # DeepSpeed's clone of the world group died with it


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny build of the demo workload (seconds): data, tokenizer, MoE teacher, student."""
    from ds_moekd.demo.build import build_demo

    out = tmp_path_factory.mktemp("tiny_demo")
    build_demo(out, seed=0, size="tiny", threads=1, log=lambda _: None)
    return out
