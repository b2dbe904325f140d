#!/usr/bin/env bash
# Many nodes with the deepspeed launcher and a hostfile ("host slots=N" per line; passwordless
# ssh between hosts, the same environment path on each).
# Usage: launcher/multinode.sh HOSTFILE CONFIG [a.b=c ...]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 HOSTFILE CONFIG [overrides]" >&2; exit 2; }
hostfile="$1"; config="$2"; shift 2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh)"
export MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
source launcher/env.sh
export PATH="$bin:$PATH"
# A SIGTERM to this script reaches the runner, which stops every node's launcher; those give the
# ranks DeepSpeed's fixed 30 s to checkpoint before killing them (docs/reliability.md). Under a
# scheduler that signals every node's processes (SLURM), the ranks get the signal directly.
exec deepspeed --hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module ds_moekd.train --config "$config" "$@"
