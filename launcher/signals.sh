# Sourced by the launch scripts: run a launcher so that a stop signal reaches the ranks and
# nothing outlives the script (docs/reliability.md, "Preemption").
#
#   run_ranks deepspeed --num_gpus 2 --module ds_moekd.train ...
#
# The launcher runs in its own process group. On SIGTERM/SIGINT/SIGHUP the script sends SIGTERM
# to the rank processes themselves (python -m ds_moekd.train), not to the launcher: launchers
# either exit at once and leave the ranks running (`deepspeed`'s runner) or kill them after a
# short grace (its per-node launch.py), before they could checkpoint. The ranks finish their step,
# commit a checkpoint and exit with 75, which the launcher passes back. Whatever is still alive
# DS_MOEKD_STOP_GRACE_S seconds after the signal (default 600), or after the launcher exits, is killed.
run_ranks() {
  setsid "$@" &
  _ds_moekd_leader=$!
  trap '_ds_moekd_stop' TERM INT HUP
  local rc
  while :; do
    wait "$_ds_moekd_leader" && rc=0 || rc=$?
    kill -0 "$_ds_moekd_leader" 2>/dev/null || break  # wait was only interrupted by a trapped signal
  done
  trap - TERM INT HUP
  if [ -n "${_ds_moekd_killer:-}" ]; then
    pkill -P "$_ds_moekd_killer" 2>/dev/null || true; kill "$_ds_moekd_killer" 2>/dev/null || true
  fi
  if pgrep -g "$_ds_moekd_leader" >/dev/null; then  # no orphans: a rank the launcher left behind
    echo "run_ranks: ending processes left in the launcher's group" >&2
    kill -TERM -- "-$_ds_moekd_leader" 2>/dev/null; sleep 5; kill -KILL -- "-$_ds_moekd_leader" 2>/dev/null
  fi
  return "$rc"
}

_ds_moekd_stop() {
  echo "run_ranks: stop signal: asking the ranks to checkpoint and exit" >&2
  local pid cmd
  for pid in $(pgrep -g "$_ds_moekd_leader"); do
    [ "$pid" = "$_ds_moekd_leader" ] && continue
    cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || continue
    case "$cmd" in
      *deepspeed.launcher*) ;;  # the per-node launcher: it would kill the ranks too early
      *ds_moekd.train*) kill -TERM "$pid" 2>/dev/null ;;
    esac
  done
  if [ -z "${_ds_moekd_killer:-}" ]; then
    (sleep "${DS_MOEKD_STOP_GRACE_S:-600}"; kill -KILL -- "-$_ds_moekd_leader" 2>/dev/null) &
    _ds_moekd_killer=$!
  fi
}

# A free loopback port for a single-node job when MASTER_PORT is not set (a fixed port collides
# with other jobs on the machine).
free_port() {
  "${1:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
