#!/usr/bin/env bash
# Many nodes with the deepspeed launcher and a hostfile ("host slots=N" per line; passwordless
# ssh between hosts, the same environment path on each).
# Usage: launcher/multinode.sh HOSTFILE CONFIG [a.b=c ...] [-- DEEPSPEED_LAUNCHER_FLAGS ...]
#   Everything after `--` goes to the deepspeed launcher, e.g. `-- --num_gpus 4` or, on nodes
#   that cannot ssh to each other, `-- --no_ssh --node_rank N` run once on every node.
#   A hostfile naming one host runs on this machine without the ssh check.
# Ranks are numbered node by node, so expert-parallel groups (blocks of consecutive ranks) stay
# inside a node while teacher.ep_size <= slots per node (docs/parallelism.md).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 HOSTFILE CONFIG [overrides] [-- launcher flags]" >&2; exit 2; }
hostfile="$1"; config="$2"; shift 2
[ -f "$hostfile" ] || { echo "multinode.sh: hostfile $hostfile does not exist" >&2; exit 2; }
hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"  # the script cds to the repo
[ -f "$config" ] && config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
overrides=(); launcher_flags=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; launcher_flags=("$@"); break; fi
  overrides+=("$1"); shift
done
hosts=$(awk 'NF && $1 !~ /^#/ {n++} END {print n+0}' "$hostfile")
[ "$hosts" -ge 1 ] || { echo "multinode.sh: $hostfile names no host" >&2; exit 2; }
if [ "$hosts" -eq 1 ]; then launcher_flags=(--no_ssh_check "${launcher_flags[@]}"); fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh)"
first_host="$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")"
[ "$first_host" = "localhost" ] && first_host=127.0.0.1
export MASTER_ADDR="${MASTER_ADDR:-$first_host}"
source launcher/env.sh
export PATH="$bin:$PATH"
# A SIGTERM to this script reaches the runner, which stops every node's launcher; those give the
# ranks DeepSpeed's fixed 30 s to checkpoint before killing them (docs/reliability.md). Under a
# scheduler that signals every node's processes (SLURM), the ranks get the signal directly.
exec deepspeed --hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  "${launcher_flags[@]}" --module ds_moekd.train --config "$config" "${overrides[@]}"
