#!/usr/bin/env bash
# The test suite (README command 2; CI runs the full tier). Creates/uses the environment like the
# quickstart, with the dev extra, at the locked versions.
#   bash tests/run.sh            full tier: everything (real 2- and 4-rank process groups, launchers, trainings)
#   bash tests/run.sh --quick    quick tier: one-process tests only (-m "not slow"; tests/conftest.py)
# Other arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
tier=(--durations=15)
if [ "${1:-}" = "--quick" ]; then
  shift
  tier=(-m "not slow" --durations=5)
  export DS_MOEKD_TEST_TIER=quick
fi
bin="$(bash launcher/setup.sh dev)"
source launcher/env.sh
exec "$bin/python" -m pytest -q "${tier[@]}" "$@"
