"""Each supported launcher starts 2 real processes that find their rank and talk over loopback.

The processes start as modules from the repo root (`-m`, `deepspeed --module`), where sys.path[0]
is the repo root: there `import kernels` must still find Hugging Face's `kernels` package (which
transformers imports), not the repo's top-level kernels/ folder (docs/kernels.md).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # real processes (tests/conftest.py: full tier)

PROBE = """
import pathlib, sys
import torch, torch.distributed as dist
import transformers.integrations.hub_kernels  # imports Hugging Face's `kernels`
import kernels
import ds_moekd.kernels
from ds_moekd.runtime.dist import init_distributed, shutdown
repo = pathlib.Path(sys.argv[1]).resolve()
shadowed = repo / "kernels" in pathlib.Path(kernels.__file__ or "").resolve().parents or not hasattr(kernels, "__version__")
info = init_distributed()
total = torch.tensor([info.rank + 1.0])
dist.all_reduce(total)
print(f"PROBE rank={info.rank} world={info.world_size} source={info.source} sum={int(total.item())} "
      f"kernels={'repo' if shadowed else 'hf'}", flush=True)
shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




def _run(cmd: list[str], tmp_path: Path) -> list[str]:
    # cwd is the repo root (first on sys.path under -m); the probe module is found on PYTHONPATH after it
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([*cmd, str(REPO)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # ranks share one stdout pipe, so their lines may interleave: find the records, not the lines
    return sorted(re.findall(r"PROBE (rank=\d+ world=\d+ source=\w+ sum=\d+ kernels=(?:hf|repo))", out.stdout))


@pytest.fixture
def probe(tmp_path):
    """The probe's module name (a file in tmp_path, which _run puts on PYTHONPATH)."""
    (tmp_path / "launch_probe.py").write_text(PROBE)
    return "launch_probe"


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: `pip install -e .[dev]` installs it")
    return str(path)


def test_deepspeed_launcher(probe, tmp_path):
    port = _free_port()
    lines = _run([_bin("deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                  "--module", probe], tmp_path)
    assert lines == ["rank=0 world=2 source=RANK sum=3 kernels=hf", "rank=1 world=2 source=RANK sum=3 kernels=hf"]


def test_torchrun(probe, tmp_path):
    lines = _run([_bin("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(_free_port()), "-m", probe], tmp_path)
    assert lines == ["rank=0 world=2 source=RANK sum=3 kernels=hf", "rank=1 world=2 source=RANK sum=3 kernels=hf"]


def test_mpirun_without_torch_variables(probe, tmp_path):
    # The MPICH mpirun of the mpi extra sets only PMI_* variables; ds_moekd.runtime.dist maps them to torch's.
    lines = _run([_bin("mpirun"), "-np", "2", sys.executable, "-m", probe], tmp_path)
    assert lines == ["rank=0 world=2 source=PMI_RANK sum=3 kernels=hf", "rank=1 world=2 source=PMI_RANK sum=3 kernels=hf"]
