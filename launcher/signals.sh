# Sourced by the launch scripts: run a launcher so that a stop signal reaches the ranks and
# nothing outlives the script (docs/reliability.md, "Preemption").
#
#   run_ranks deepspeed --num_gpus 2 --module ds_moekd.train ...
#
# On SIGTERM/SIGINT/SIGHUP the script sends SIGTERM to this machine's rank processes themselves
# (`ds_moekd.train` below the launcher), not to the launcher: launchers either exit at once and
# leave the ranks running (`deepspeed`'s runner) or kill them after a short grace (its per-node
# launch.py) before they could checkpoint. The ranks finish their step, commit a checkpoint and
# exit with 75, which the launcher passes back. Whatever is still alive DS_MOEKD_STOP_GRACE_S
# seconds after the signal (default 600), or once the launcher has exited, is killed.
# A script killed outright (SIGKILL) cannot do any of this: the ranks watch its pid,
# DS_MOEKD_WATCH_PID, and checkpoint and exit on their own once it is gone (ds_moekd/run/launcher_watch.py).
run_ranks() {
  export DS_MOEKD_WATCH_PID="$BASHPID"
  setsid "$@" &
  _ds_moekd_leader=$!
  _ds_moekd_seen=""
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
  _ds_moekd_end_leftovers
  return "$rc"
}

_ds_moekd_descendants() {  # every process below $1 (launchers may start ranks in other groups)
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; _ds_moekd_descendants "$child"; done
}

_ds_moekd_is_rank() {  # a rank process (not a launcher that has the module name in its arguments)
  local cmd
  cmd="$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null)" || return 1
  case "$cmd" in *deepspeed.launcher*|*bin/deepspeed\ *|*mpirun*|*mpiexec*) return 1 ;; *ds_moekd.train*) return 0 ;; esac
  return 1
}

_ds_moekd_stop() {
  echo "run_ranks: stop signal: asking the ranks to checkpoint and exit" >&2
  local pid
  for pid in $(_ds_moekd_descendants "$_ds_moekd_leader"); do
    _ds_moekd_is_rank "$pid" || continue
    _ds_moekd_seen="$_ds_moekd_seen $pid"
    kill -TERM "$pid" 2>/dev/null || true
  done
  if [ -z "${_ds_moekd_killer:-}" ]; then
    (sleep "${DS_MOEKD_STOP_GRACE_S:-600}"; kill -KILL -- "-$_ds_moekd_leader" $_ds_moekd_seen 2>/dev/null) &
    _ds_moekd_killer=$!
  fi
}

_ds_moekd_end_leftovers() {  # no orphans: processes the launcher left behind
  local pid left=""
  for pid in $(pgrep -g "$_ds_moekd_leader") $_ds_moekd_seen; do
    kill -0 "$pid" 2>/dev/null && _ds_moekd_is_rank "$pid" && left="$left $pid"
  done
  pgrep -g "$_ds_moekd_leader" >/dev/null && left="$left -$_ds_moekd_leader"
  [ -z "$left" ] && return 0
  echo "run_ranks: ending processes the launcher left behind:$left" >&2
  kill -TERM -- $left 2>/dev/null || true
  sleep 5
  kill -KILL -- $left 2>/dev/null || true
}

# A free loopback port for a single-node job when MASTER_PORT is not set (a fixed port collides
# with other jobs on the machine).
free_port() {
  "${1:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
