#!/usr/bin/env bash
# Move the lock (launcher/constraints.txt) to the newest releases, on purpose (docs/install.md):
#   bash launcher/refresh_lock.sh
# 1. a fresh virtualenv in .venv-newest/ gets the CPU torch of the lock (a newer torch is a
#    separate decision: edit its line first) and the newest releases of everything else that
#    ds-moekd and its dev extra need;
# 2. the whole test suite runs in it (tests/run.sh, as CI runs it);
# 3. only if it passes is the lock rewritten from that environment (`pip freeze`); otherwise the
#    lock stays as it is and the failing run's log is kept in .venv-newest/suite.log.
set -euo pipefail
if [ $# -gt 0 ]; then
  echo "refresh_lock: takes no arguments (the lock is rewritten only after the whole suite passes)" >&2; exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
lock="$repo/launcher/constraints.txt"
env_dir="$repo/.venv-newest"
rm -rf "$env_dir"
python3 -m venv "$env_dir"
py="$env_dir/bin/python"
"$py" -m pip install -q "$(grep -iE '^torch==' "$lock")"
"$py" -m pip install -q --upgrade -e ".[dev]"
"$py" -m pip list --format=freeze 2>/dev/null | grep -iE '^(transformers|deepspeed|kernels|torch|accelerate)==' \
  | sed 's/^/refresh_lock: newest: /' >&2
if ! VIRTUAL_ENV="$env_dir" PATH="$env_dir/bin:$PATH" DS_MOEKD_NO_INSTALL=1 bash tests/run.sh \
    2>&1 | tee "$env_dir/suite.log"; then
  echo "refresh_lock: the suite failed on the newest releases; the lock is unchanged (log: $env_dir/suite.log)" >&2
  exit 1
fi
{
  echo "# The versions the whole test suite last passed with (launcher/setup.sh installs these;"
  echo "# refresh with: bash launcher/refresh_lock.sh). Written $(date -u +%Y-%m-%d), Python $("$py" -c 'import platform; print(platform.python_version())')."
  # local version labels (torch's +cpu) are dropped: `==2.13.0` matches the CPU and the CUDA build
  "$py" -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > "$lock.new"
mv "$lock.new" "$lock"
echo "refresh_lock: wrote $lock from the environment the suite passed in" >&2
