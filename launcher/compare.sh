#!/usr/bin/env bash
# Every method on several seeds, the paper's way (docs/comparison.md): per seed an SFT init of the
# student, then every method from it; 2 ranks per run (teacher EP 2, student ZeRO-3) on this
# machine; sampled and greedy held-out scores. Arguments go to `ds-moekd compare`, e.g.
#   bash launcher/compare.sh --seeds 5 --eval-seeds 5 train.steps=200
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh)"
source launcher/env.sh
export PATH="$bin:$PATH"
exec "$bin/python" -m ds_moekd.cli compare "$@"
