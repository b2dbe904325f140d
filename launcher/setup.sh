#!/usr/bin/env bash
# Make sure a Python environment with ds-moekd installed exists; print its bin directory.
# Usage: setup.sh [EXTRAS]   e.g. setup.sh dev  (the tests need the dev extra; the quickstart none)
# - An active virtualenv/conda env is used as it is (a GPU user keeps their own CUDA torch).
# - Otherwise ./.venv is created. Without a GPU, torch==2.13.0 (CPU build) is installed first,
#   so that the unpinned `torch` dependency never pulls a multi-GB CUDA build.
# Re-running is cheap: installation is skipped while pyproject.toml is unchanged.
# DS_MOEKD_NO_INSTALL=1: use the active environment as it is, never install (prepared cluster
# images, the launcher tests); it must already import ds_moekd.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  bin="$(dirname "$(command -v python)")"
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
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! "$bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "setup: GPU found; pip will install torch with CUDA" >&2
    else
      echo "setup: no GPU; installing the CPU build torch==2.13.0" >&2
      "$bin/python" -m pip install -q torch==2.13.0 >&2
    fi
  fi
  echo "setup: installing ds-moekd and its dependencies (editable${extras:+, extras: $extras})" >&2
  "$bin/python" -m pip install -q -e ".${extras:+[$extras]}" >&2
  echo "$want" > "$stamp"
fi
echo "$bin"
