#!/usr/bin/env bash
# Every method on several seeds, side by side (docs/comparison.md): 2 ranks per run (teacher EP 2,
# student ZeRO-3) on this machine. Arguments go to `ds-moekd compare`, e.g.
#   bash launcher/compare.sh --seeds 3 train.steps=200
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh)"
source launcher/env.sh
export PATH="$bin:$PATH"
exec "$bin/python" -m ds_moekd.cli compare "$@"
