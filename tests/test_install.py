"""The installed layout: the repo's top-level kernels/ folder never shadows Hugging Face's `kernels`.

transformers (5.25 on) imports `kernels` from its hub-kernels integration, and every launcher
(`python -m`, `deepspeed --module`, `torchrun -m`, pytest) puts the repo root first on sys.path.
kernels/ therefore has no __init__.py: from the root it is at most a namespace portion, which any
regular package later on sys.path outranks. The 2-rank version of this check is test_launchers.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PROBE = """
import pathlib, sys
import transformers.integrations.hub_kernels
import kernels
import ds_moekd.kernels
from ds_moekd.kernels import grouped_experts
print(pathlib.Path(kernels.__file__).resolve())
print(pathlib.Path(ds_moekd.kernels.__file__).resolve())
"""


def test_kernels_folder_is_not_a_regular_package():
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder importable as `kernels` from the repo root, shadowing "
        "Hugging Face's `kernels` that transformers imports; the package is kernels/ds_moekd_kernels/")
    assert (REPO / "kernels" / "ds_moekd_kernels" / "__init__.py").is_file()


@pytest.mark.slow  # a fresh interpreter: the only honest check of what the repo root on sys.path does
def test_hf_kernels_and_ours_import_together_from_the_repo_root():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hf_path, ours_path = (Path(line) for line in out.stdout.split())
    assert REPO / "kernels" not in hf_path.parents, f"`import kernels` found the repo's folder: {hf_path}"
    # editable install: the source folder; a regular install: site-packages/ds_moekd/kernels
    assert ours_path.parent in (REPO / "kernels" / "ds_moekd_kernels", hf_path.parents[1] / "ds_moekd" / "kernels")


def test_this_pytest_process_sees_hf_kernels():
    import kernels

    assert hasattr(kernels, "__version__") and REPO / "kernels" not in Path(kernels.__file__).resolve().parents
