#!/usr/bin/env bash
# N processes of the CLI on this machine, joined by jax.distributed (coordinator on localhost).
#   launch/multiprocess.sh 2 experiments/configs/default.py runs/mp [--config.mesh.data=2 ...]
#
# Environment (all optional):
#   PORT                 coordinator port (default: a free port picked by python)
#   DEVICES_PER_PROCESS  CPU devices each process simulates (default 1); ignored if XLA_FLAGS is set
#   JAX_PLATFORMS        default cpu
#   XLA_FLAGS            default --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS
#
# Process 0 writes to this terminal; process i > 0 to $WORKDIR/process_<i>.log. The script waits for
# all of them and exits with the first non-zero exit code. On Ctrl-C every process gets SIGINT and exits
# (code 130) after a few seconds of shutdown; on SIGTERM / SIGHUP the script sends them SIGINT (not
# SIGTERM, which a multi-process JAX run takes as a preemption notice and keeps going). Those still alive
# after KILL_AFTER seconds (default 30), or on a second Ctrl-C, get SIGKILL. If one process fails, the
# others get SIGINT and, 5 s later, SIGKILL (they may be blocked in a collective with the failed one).
# Checkpoints are written atomically (a half-written one is discarded), so the same command resumes
# after a kill. Relative paths are relative to the repo root (the script cd's there, like
# launch/local.sh). Needs bash >= 4.4 and the repo's .venv.
set -euo pipefail

usage="usage: launch/multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [flags...]"
if [ "$#" -lt 3 ]; then
  echo "$usage" >&2
  exit 2
fi
NUM_PROCESSES=$1
CONFIG=$2
WORKDIR=$3
shift 3
case $NUM_PROCESSES in
  '' | *[!0-9]* | 0*)
    echo "error: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2
    echo "$usage" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
if [ ! -x "$PYTHON" ]; then
  echo "error: $PYTHON not found; create the venv first (make test, or python3 -m venv .venv && .venv/bin/pip install -e .)" >&2
  exit 2
fi

if [ -z "${PORT:-}" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}}
KILL_AFTER=${KILL_AFTER:-30}
mkdir -p "$WORKDIR"

pids=()
force=0
stop_all() {  # stop_all GRACE [no_sigint]: SIGINT to every process, SIGKILL to those alive after GRACE s
  local pid i alive grace=$1
  if [ "${2:-}" != no_sigint ]; then
    for pid in "${pids[@]}"; do
      kill -INT "$pid" 2>/dev/null || true
    done
  fi
  for ((i = 0; i < grace * 10 && force == 0; i++)); do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
on_signal() {
  trap 'force=1' INT TERM HUP  # a second Ctrl-C skips the grace period
  trap - EXIT
  echo "multiprocess.sh: interrupted; stopping all processes (SIGKILL in ${KILL_AFTER}s or on a second Ctrl-C)" >&2
  stop_all "$KILL_AFTER" "${2:-}"
  exit "$1"
}
# A Ctrl-C in the terminal reaches every process of the foreground process group, i.e. this script and
# all N processes (KeyboardInterrupt: the CLI exits with code 130), so it is not sent again.
trap 'on_signal 130 no_sigint' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP
trap 'stop_all 5' EXIT  # also if this script itself fails

if [ "$NUM_PROCESSES" -gt 1 ]; then
  echo "multiprocess.sh: $NUM_PROCESSES processes (coordinator localhost:$PORT, XLA_FLAGS=$XLA_FLAGS);" \
    "process 0 prints here, process i > 0 logs to $WORKDIR/process_<i>.log" >&2
fi
for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=("$PYTHON" -m recgpt_jax.main --config="$CONFIG" --workdir="$WORKDIR"
    --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$i" "$@")
  # Background processes of a script start with SIGINT ignored; reset it so Ctrl-C stops them (exec: the
  # wrapper becomes the process, $! is its pid).
  unignore=("$PYTHON" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])')
  if [ "$i" = 0 ]; then
    "${unignore[@]}" "${cmd[@]}" &
  else
    "${unignore[@]}" "${cmd[@]}" >"$WORKDIR/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Wait for all; on the first failure stop the others.
done_=()
remaining=$NUM_PROCESSES
while [ "$remaining" -gt 0 ]; do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [ -n "${done_[i]:-}" ] && continue
    pid=${pids[i]}
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    done_[i]=1
    remaining=$((remaining - 1))
    if [ "$rc" != 0 ]; then
      echo "multiprocess.sh: process $i exited with code $rc; stopping the others" >&2
      if [ "$i" != 0 ]; then
        echo "--- last lines of $WORKDIR/process_$i.log:" >&2
        tail -n 15 "$WORKDIR/process_$i.log" >&2 || true
        echo "---" >&2
      fi
      trap - EXIT
      trap 'force=1' INT TERM HUP
      stop_all 5  # the others may be blocked in a collective with the failed one: a short grace
      exit "$rc"
    fi
  done
  [ "$remaining" -gt 0 ] && sleep 0.5
done
trap - INT TERM HUP EXIT
