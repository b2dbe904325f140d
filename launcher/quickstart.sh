#!/usr/bin/env bash
# The main job on the embedded default: the paper's Knowledge Augmentation (method ka) from the
# demo MoE teacher into the demo student, 2 ranks (CPU processes here, GPUs where present), teacher
# expert-parallel size 2, student ZeRO-3. Writes runs/quickstart/. Extra arguments are config overrides (a.b=c).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh)"
source launcher/env.sh
source launcher/signals.sh
export PATH="$bin:$PATH"
export MASTER_PORT="${MASTER_PORT:-$(free_port "$bin/python")}"
# Two ranks share this machine's cores: one rank's intra-op threads must not starve the other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) > 3 ? $(nproc) / 2 : 1 ))}"
# SIGTERM/Ctrl-C: the ranks checkpoint and the script exits with 75 (launcher/signals.sh).
run_ranks deepspeed --num_gpus 2 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module ds_moekd.train --config ds_configs/quickstart.yaml "$@"
echo "quickstart: wrote runs/quickstart/ (report.md, run.json, metrics.jsonl, student_hf/)"
