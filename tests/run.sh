#!/usr/bin/env bash
# The whole test suite (README command 2; CI runs exactly this). Creates/uses the environment
# like the quickstart, with the dev extra. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="$(bash launcher/setup.sh dev)"
source launcher/env.sh
exec "$bin/python" -m pytest -q --durations=15 "$@"
