#!/usr/bin/env bash
# mpirun launch (Open MPI or MPICH; `pip install -e .[mpi]` brings mpi4py and an MPICH mpirun).
# ds_moekd.runtime.dist reads the rank from OMPI_*/PMI_* variables and sets RANK/WORLD_SIZE/LOCAL_RANK.
# Usage: launcher/mpirun.sh NUM_PROCS CONFIG [a.b=c ...]   (extra mpirun flags: MPIRUN_ARGS)
# Across hosts, set MASTER_ADDR to the first host's address and pass a hostfile in MPIRUN_ARGS.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NUM_PROCS CONFIG [overrides]" >&2; exit 2; }
nprocs="$1"; config="$2"; shift 2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh mpi)"
source launcher/env.sh
source launcher/signals.sh
# One host: any free port (a fixed one collides with other jobs). Across hosts set MASTER_PORT.
if [ "$MASTER_ADDR" = "127.0.0.1" ]; then export MASTER_PORT="${MASTER_PORT:-$(free_port "$bin/python")}"; fi
export MASTER_PORT="${MASTER_PORT:-29500}"
# MPICH's mpirun forwards the environment by default; Open MPI needs -x for each variable.
if "$bin/mpirun" --version 2>/dev/null | grep -qi "open mpi"; then
  fwd=(-x MASTER_ADDR -x MASTER_PORT -x DS_ACCELERATOR -x GLOO_SOCKET_IFNAME -x TORCH_EXTENSIONS_DIR -x PATH)
else
  fwd=()
fi
# SIGTERM/Ctrl-C: this host's ranks checkpoint and exit with 75 (launcher/signals.sh).
run_ranks "$bin/mpirun" -np "$nprocs" "${fwd[@]}" ${MPIRUN_ARGS:-} \
  "$bin/python" -m ds_moekd.train --config "$config" "$@"
