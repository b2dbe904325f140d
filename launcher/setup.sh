#!/usr/bin/env bash
# Make sure a Python environment with ds-moekd installed exists; print its bin directory.
# Usage: setup.sh [EXTRAS]   e.g. setup.sh dev  (the tests need the dev extra; the quickstart none)
# - An active virtualenv/conda env is used as it is (a GPU user keeps their own CUDA torch).
# - Otherwise ./.venv is created. Without a GPU, the CPU build of the locked torch is installed
#   first, so that the unpinned `torch` dependency never pulls a multi-GB CUDA build.
# - Every package is installed at the version in launcher/constraints.txt, the lock of the versions
#   the test suite last passed with (docs/install.md). A GPU or an active environment keeps its
#   own accelerator stack (torch, triton, NVIDIA wheels); everything else is still locked.
# Re-running is cheap: installation is skipped while pyproject.toml and the lock are unchanged.
# DS_MOEKD_NO_INSTALL=1: use the active environment as it is, never install (prepared cluster
# images, the launcher tests, the lock refresh); it must already import ds_moekd.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
lock="$repo/launcher/constraints.txt"
own_env=0
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  bin="$(dirname "$(command -v python)")"
  own_env=1
else
  [ -x .venv/bin/python ] || python3 -m venv .venv >&2
  bin="$repo/.venv/bin"
fi
if [ "${DS_MOEKD_NO_INSTALL:-0}" = 1 ]; then
  "$bin/python" -c "import ds_moekd" 2>/dev/null \
    || { echo "setup: DS_MOEKD_NO_INSTALL=1 but $bin/python cannot import ds_moekd" >&2; exit 1; }
  echo "$bin"; exit 0
fi
extras="${1:-}"
stamp="$bin/../.ds-moekd-installed${extras:+-$extras}"  # one per extras set: switching never reinstalls
want="$(cat pyproject.toml "$lock" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  gpu=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
  constraints="$lock"
  if [ "$gpu" = 1 ] || [ "$own_env" = 1 ]; then
    # the accelerator stack stays as the GPU/the user's environment has it; the rest is locked
    constraints="$(mktemp)"
    grep -viE '^(torch|triton|pytorch-triton|nvidia-[a-z0-9-]+)==' "$lock" > "$constraints"
  fi
  if ! "$bin/python" -c "import torch" 2>/dev/null; then
    if [ "$gpu" = 1 ]; then
      echo "setup: GPU found; pip will install torch with CUDA" >&2
    else
      torch_pin="$(grep -iE '^torch==' "$lock")"
      echo "setup: no GPU; installing the CPU build $torch_pin" >&2
      "$bin/python" -m pip install -q "$torch_pin" >&2
    fi
  fi
  echo "setup: installing ds-moekd and its dependencies at the locked versions (editable${extras:+, extras: $extras})" >&2
  "$bin/python" -m pip install -q -c "$constraints" -e ".${extras:+[$extras]}" >&2
  [ "$constraints" = "$lock" ] || rm -f "$constraints"
  echo "$want" > "$stamp"
fi
echo "$bin"
